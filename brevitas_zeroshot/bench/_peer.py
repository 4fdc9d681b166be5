"""The peer generator for the benchmarks: Sony MCT's PyTorch data generation, with its own defaults.

An optional benchmark dependency (``pip install 'brevitas-zeroshot[bench]'``), called only through MCT's public
API (``get_pytorch_data_generation_config`` + ``pytorch_data_generation_experimental``); none of its code is here.
"""

import random
import time

import torch

from .._errors import BzqError
from ..synth import CalibrationSet, balanced_labels
from ..synth._set import set_meta
from ..synth._sources import register_source

__all__ = ["mct"]

# MCT takes the input normalisation as an enum, not as numbers: the model's mean/std must be one of these.
_NORMALIZATION = {
    ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)): "TORCHVISION",
    ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)): "KERAS_APPLICATIONS",
    ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)): "NO_NORMALIZATION",
}


@register_source("mct")
def mct(model, data_config, num_images, seed, out, device, **settings) -> CalibrationSet:
    """Sony Model Compression Toolkit's data generation with its defaults; ``settings`` override them."""
    try:
        import numpy as np
        from model_compression_toolkit import data_generation as dg
        from model_compression_toolkit.data_generation import (
            ImageNormalizationType,
            get_pytorch_data_generation_config,
            pytorch_data_generation_experimental,
        )
    except ImportError as e:
        raise BzqError(
            f"the 'mct' source needs Sony's model-compression-toolkit ({e}): pip install 'brevitas-zeroshot[bench]'."
        ) from None
    norm = tuple(tuple(round(float(v), 3) for v in data_config[k]) for k in ("mean", "std"))
    if norm not in _NORMALIZATION:
        raise BzqError(f"MCT supports only its built-in input normalisations, not mean/std {norm}.")
    enums = {
        "image_pipeline_type": dg.ImagePipelineType,
        "output_loss_type": dg.OutputLossType,
        "image_granularity": dg.ImageGranularity,
        "data_init_type": dg.DataInitType,
        "layer_weighting_type": dg.BNLayerWeightingType,
        "scheduler_type": dg.SchedulerType,
    }
    for key, value in list(settings.items()):  # enum members by name, e.g. mct[image_pipeline_type=IDENTITY]
        if key in enums and isinstance(value, str):
            try:
                settings[key] = enums[key][value]
            except KeyError:
                raise BzqError(f"mct: {key} must be one of {', '.join(enums[key].__members__)}.") from None
    settings.setdefault("image_normalization_type", getattr(ImageNormalizationType, _NORMALIZATION[norm]))
    config = get_pytorch_data_generation_config(**settings)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    was_training = model.training
    start = time.perf_counter()
    try:
        images = pytorch_data_generation_experimental(model, num_images, tuple(data_config["input_size"][1:]), config)
    finally:
        model.train(was_training)
    meta = set_meta("mct", model, data_config, seed)
    meta["synthesis_seconds"] = round(time.perf_counter() - start, 3)
    named = {k: getattr(v, "name", v) for k, v in settings.items()}  # enum members by name
    meta["config"] = {k: v for k, v in named.items() if isinstance(v, int | float | str | bool)}
    labels = balanced_labels(num_images, data_config.get("num_classes") or 1, seed)  # MCT is not class-conditional
    result = CalibrationSet(torch.cat(images).float().cpu(), labels, meta)
    if out is not None:
        result.save(out)
    return result
