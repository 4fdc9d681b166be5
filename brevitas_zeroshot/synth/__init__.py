from ._bn import BNStatistics as BNStatistics
from ._bn import find_bn_layers as find_bn_layers
from ._bn import profile_set as profile_set
from ._set import CalibrationSet as CalibrationSet
from ._set import SyntheticSet as SyntheticSet
from ._set import model_fingerprint as model_fingerprint
from ._sources import create_calibration_set as create_calibration_set
from ._sources import list_sources as list_sources
from ._sources import register_source as register_source
from ._synthesiser import SynthesisConfig as SynthesisConfig
from ._synthesiser import Synthesiser as Synthesiser
from ._synthesiser import SyntheticCalibrator as SyntheticCalibrator
from ._synthesiser import balanced_labels as balanced_labels

__all__ = [
    "BNStatistics",
    "CalibrationSet",
    "SynthesisConfig",
    "Synthesiser",
    "SyntheticCalibrator",
    "SyntheticSet",
    "balanced_labels",
    "create_calibration_set",
    "find_bn_layers",
    "list_sources",
    "model_fingerprint",
    "profile_set",
    "register_source",
]
