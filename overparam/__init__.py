"""overparam: experiments on over-parametrised neural networks as Lightning plugins."""

__version__ = "0.1.0"
