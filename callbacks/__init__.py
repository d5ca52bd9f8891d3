"""Analysis callbacks (installed as ``overparam.callbacks``)."""

from overparam.callbacks.barriers import InterpolationBarrier
from overparam.callbacks.batch_size import BatchSizeSwitch
from overparam.callbacks.constraints import ConstraintCounter
from overparam.callbacks.ensemble import EnsembleEvaluation
from overparam.callbacks.gradient_noise import GradientNoise
from overparam.callbacks.hessian import HessianSpectrum
from overparam.callbacks.progress import MetricsProgressBar, ProgressLines
from overparam.callbacks.sharpness import SharpnessTracker
from overparam.callbacks.surface import LossSurface
from overparam.callbacks.trajectory import TrajectorySnapshots

__all__ = [
    "BatchSizeSwitch",
    "ConstraintCounter",
    "EnsembleEvaluation",
    "GradientNoise",
    "HessianSpectrum",
    "InterpolationBarrier",
    "LossSurface",
    "MetricsProgressBar",
    "ProgressLines",
    "SharpnessTracker",
    "TrajectorySnapshots",
]
