"""Calibration sources behind one interface: ``gznq`` (ours), ``zeroq``, ``gaussian``, a real folder, a saved set.

Third-party sources register with :func:`register_source` or through the ``brevitas_zeroshot.sources`` entry-point
group; a source is a callable ``(model, data_config, num_images, seed, out, device, **settings) -> CalibrationSet``.
"""

import logging
from collections.abc import Callable
from dataclasses import asdict
from importlib.metadata import entry_points
from pathlib import Path

import torch
from torch import nn

from .._errors import BzqError
from ..models import resolve_data_config
from ._set import MANIFEST, CalibrationSet, set_meta
from ._synthesiser import SynthesisConfig, Synthesiser, balanced_labels

__all__ = ["check_source", "create_calibration_set", "list_sources", "register_source", "ZEROQ_SETTINGS"]

_logger = logging.getLogger(__name__)
_SOURCES: dict[str, Callable[..., CalibrationSet]] = {}

# ZeroQ-style baseline: square loss on BN statistics, plain pixels, no labels, priors or augmentation.
ZEROQ_SETTINGS = dict(
    bn_loss="l2",
    parameterization="pixel",
    init="noise",
    smooth=0.0,
    ce_weight=0.0,
    tv_weight=0.0,
    l2_weight=0.0,
    jitter=0.0,
    flip=False,
)


def register_source(name: str) -> Callable:
    """Decorator: make a calibration source available as ``--calib NAME``."""

    def wrap(fn: Callable[..., CalibrationSet]) -> Callable[..., CalibrationSet]:
        _SOURCES[name] = fn
        return fn

    return wrap


def list_sources() -> list[str]:
    _load_entry_points()
    return sorted(_SOURCES)


def _load_entry_points() -> None:
    for ep in entry_points(group="brevitas_zeroshot.sources"):
        if ep.name not in _SOURCES:
            try:
                _SOURCES[ep.name] = ep.load()
            except Exception as e:  # a broken plug-in must not break the built-in sources
                _logger.warning("calibration source plug-in '%s' failed to load: %s", ep.name, e)


def create_calibration_set(
    source: str | Path,
    model: nn.Module,
    data_config: dict | None = None,
    num_images: int = 256,
    seed: int = 0,
    out: str | Path | None = None,
    device: str | torch.device | None = None,
    **settings,
) -> CalibrationSet:
    """Make (or read) the calibration set named by ``source`` for the float ``model``.

    ``source`` is a registered name (``gznq``, ``zeroq``, ``gaussian``...), a folder written by ``bzq generate``,
    or a real image folder / ``.tar`` (ImageFolder layout or ``labels.csv``).
    """
    data_config = data_config or resolve_data_config(model)
    name = str(source)
    kind = check_source(name)
    if kind == "registered":
        return _SOURCES[name](model, data_config, num_images, seed, out, device, **settings)
    if kind == "set":
        _ignored("a saved set", settings)
        return CalibrationSet.load(name, model=model, data_config=data_config)
    return real_images(model, data_config, num_images, seed, out, device, folder=Path(name), **settings)


def check_source(source: str | Path) -> str:
    """What ``source`` names: ``registered`` (a source name), ``set`` (a saved set) or ``images`` (a real image
    folder or archive); an unknown name or a missing path is refused before any work."""
    name = str(source)
    _load_entry_points()
    if name in _SOURCES:
        return "registered"
    path = Path(name)
    if path.is_dir() and (path / MANIFEST).exists():
        return "set"
    if path.exists():
        return "images"
    raise BzqError(
        f"unknown calibration source '{name}': not a folder or file, nor one of {', '.join(list_sources())}."
    )


@register_source("gznq")
def gznq(model, data_config, num_images, seed, out, device, **settings) -> CalibrationSet:
    """Ours: BN-distribution matching (Gaussian KL) with a learned per-pixel image distribution."""
    overwrite = settings.pop("overwrite", False)  # a different set already in ``out`` is replaced, a same one resumed
    calib = Synthesiser(model, data_config, device, num_images=num_images, seed=seed, **settings)
    return calib.generate(out, overwrite=overwrite)


@register_source("zeroq")
def zeroq(model, data_config, num_images, seed, out, device, **settings) -> CalibrationSet:
    """Baseline: ZeroQ-style square loss on BN statistics over plain pixels."""
    overwrite = settings.pop("overwrite", False)
    _ignored("zeroq", {k: v for k, v in settings.items() if k in ZEROQ_SETTINGS})
    calib = Synthesiser(
        model, data_config, device, source="zeroq", num_images=num_images, seed=seed, **{**settings, **ZEROQ_SETTINGS}
    )
    return calib.generate(out, overwrite=overwrite)


@register_source("gaussian")
def gaussian(model, data_config, num_images, seed, out, device, **settings) -> CalibrationSet:
    """Baseline: N(0, 1) noise in the normalised input space."""
    _ignored("gaussian", settings)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn((num_images, *data_config["input_size"]), generator=g)
    labels = balanced_labels(num_images, data_config.get("num_classes") or 1, seed)
    return _finish(CalibrationSet(images, labels, set_meta("gaussian", model, data_config, seed)), out)


def _ignored(source: str, settings: dict) -> None:
    """Say which synthesis settings a source does not use, when they differ from the defaults."""
    defaults = asdict(SynthesisConfig())
    changed = sorted(k for k, v in settings.items() if k in defaults and v != defaults[k])  # not overwrite
    fixed = ZEROQ_SETTINGS if source == "zeroq" else {}
    changed = [k for k in changed if fixed.get(k) != settings[k]]
    if changed:
        _logger.warning("calibration source '%s' ignores the synthesis setting(s): %s", source, ", ".join(changed))


def real_images(model, data_config, num_images, seed, out, device, folder: Path, **settings) -> CalibrationSet:
    """Baseline: ``num_images`` real images drawn (seeded) from a labelled folder, with the model's eval transform."""
    from ..data import ImageFolderDataset, create_eval_transform

    _ignored("real images", settings)
    dataset = ImageFolderDataset(folder, create_eval_transform(data_config))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=g)[:num_images].sort().values
    pairs = [dataset[int(i)] for i in order]
    images = torch.stack([p[0] for p in pairs])
    labels = torch.tensor([p[1] for p in pairs])
    meta = set_meta("real", model, data_config, seed)
    meta["folder"] = str(folder)
    return _finish(CalibrationSet(images, labels, meta), out)


def _finish(result: CalibrationSet, out: str | Path | None) -> CalibrationSet:
    if out is not None:
        result.save(out)
    return result
