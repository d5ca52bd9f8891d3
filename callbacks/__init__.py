"""Analysis callbacks (installed as ``overparam.callbacks``)."""
from overparam.callbacks.batch_size import BatchSizeSwitch  # noqa: F401
from overparam.callbacks.gradient_noise import GradientNoise  # noqa: F401
from overparam.callbacks.barriers import InterpolationBarrier  # noqa: F401
from overparam.callbacks.constraints import ConstraintCounter  # noqa: F401
from overparam.callbacks.ensemble import EnsembleEvaluation  # noqa: F401
from overparam.callbacks.hessian import HessianSpectrum  # noqa: F401
