"""brevitas-zeroshot: zero-shot post-training quantization with images synthesised from BatchNorm statistics."""

from ._errors import BzqError as BzqError
from ._evaluate import evaluate as evaluate
from .data import create_loader as create_loader
from .models import load_model as load_model
from .models import resolve_data_config as resolve_data_config
from .synth import SynthesisConfig as SynthesisConfig
from .synth import SyntheticCalibrator as SyntheticCalibrator
from .synth import SyntheticSet as SyntheticSet
from .version import __version__ as __version__

__all__ = [
    "BzqError",
    "SynthesisConfig",
    "SyntheticCalibrator",
    "SyntheticSet",
    "__version__",
    "create_loader",
    "evaluate",
    "load_model",
    "resolve_data_config",
]
