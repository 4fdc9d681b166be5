from ._api import load_quantized as load_quantized
from ._api import lower_quantized as lower_quantized
from ._api import quantize as quantize
from ._api import save_quantized as save_quantized
from ._brevitas import BrevitasConfig as BrevitasConfig
from ._pt2e import PT2EConfig as PT2EConfig
from ._pt2e import default_quantizer as default_quantizer
from ._registry import CalibrationBatches as CalibrationBatches
from ._registry import register_backend as register_backend

__all__ = [
    "BrevitasConfig",
    "CalibrationBatches",
    "PT2EConfig",
    "default_quantizer",
    "load_quantized",
    "lower_quantized",
    "quantize",
    "register_backend",
    "save_quantized",
]
