"""brevitas-zeroshot: zero-shot post-training quantization with images synthesised from BatchNorm statistics."""

from ._errors import BzqError as BzqError
from ._evaluate import evaluate as evaluate
from .data import create_loader as create_loader
from .models import load_model as load_model
from .models import resolve_data_config as resolve_data_config
from .quant import BrevitasConfig as BrevitasConfig
from .quant import PT2EConfig as PT2EConfig
from .quant import load_quantized as load_quantized
from .quant import quantize as quantize
from .quant import register_backend as register_backend
from .quant import save_quantized as save_quantized
from .synth import CalibrationSet as CalibrationSet
from .synth import SynthesisConfig as SynthesisConfig
from .synth import Synthesiser as Synthesiser
from .synth import SyntheticCalibrator as SyntheticCalibrator
from .synth import SyntheticSet as SyntheticSet
from .synth import create_calibration_set as create_calibration_set
from .synth import list_sources as list_sources
from .synth import register_source as register_source
from .version import __version__ as __version__

__all__ = [
    "BrevitasConfig",
    "BzqError",
    "CalibrationSet",
    "PT2EConfig",
    "SynthesisConfig",
    "Synthesiser",
    "SyntheticCalibrator",
    "SyntheticSet",
    "__version__",
    "create_calibration_set",
    "create_loader",
    "evaluate",
    "list_sources",
    "load_model",
    "load_quantized",
    "quantize",
    "register_backend",
    "register_source",
    "resolve_data_config",
    "save_quantized",
]
