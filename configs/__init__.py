"""The shipped configs, a package so that they travel in the wheel (``overparam.configs``)."""
