from ._bn import BNStatistics as BNStatistics
from ._bn import find_bn_layers as find_bn_layers
from ._calibrator import SynthesisConfig as SynthesisConfig
from ._calibrator import SyntheticCalibrator as SyntheticCalibrator
from ._calibrator import balanced_labels as balanced_labels
from ._set import SyntheticSet as SyntheticSet
from ._set import model_fingerprint as model_fingerprint

__all__ = [
    "BNStatistics",
    "SynthesisConfig",
    "SyntheticCalibrator",
    "SyntheticSet",
    "balanced_labels",
    "find_bn_layers",
    "model_fingerprint",
]
