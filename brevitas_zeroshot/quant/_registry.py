"""Backends keyed by their config type (as torchao's ``quantize_`` handlers), and the calibration data they take.

A backend is three functions: ``quantize(float_model, batches, config) -> (qmodel, report)``,
``save(qmodel, out, example, report, export_onnx) -> {role: file name}`` and ``load(folder, meta) -> qmodel``, and
optionally ``lower(qmodel, example) -> (model, runtime)``: the model as it runs when deployed (compiled).
Register one with :func:`register_backend`; ``quantize``/``save_quantized``/``load_quantized`` find it by the
config's type (for loading, by the name stored in ``quant_config.json``).
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from .._errors import BzqError

__all__ = [
    "Backend",
    "CalibrationBatches",
    "as_batches",
    "backend_for",
    "backend_named",
    "create_quant_config",
    "quant_keys",
    "register_backend",
]


@dataclass(frozen=True)
class Backend:
    name: str
    config_type: type
    quantize: Callable
    save: Callable
    load: Callable
    lower: Callable | None = None
    # Config fields added since models or results were first saved, with the value one saved without them was made
    # with: a saved model reloads as it was built, a benchmark cell is not redone when only a no-op field appeared.
    added: dict | None = None


_BACKENDS: dict[type, Backend] = {}


def register_backend(
    config_type: type,
    name: str,
    *,
    quantize: Callable,
    save: Callable,
    load: Callable,
    lower: Callable | None = None,
    added: dict | None = None,
) -> None:
    """Make ``quantize(model, calibration, config_type(...))`` use this backend."""
    _BACKENDS[config_type] = Backend(name, config_type, quantize, save, load, lower, added)


def backend_for(config) -> Backend:
    for cls in type(config).__mro__:
        if cls in _BACKENDS:
            return _BACKENDS[cls]
    known = ", ".join(b.config_type.__name__ for b in _BACKENDS.values())
    raise BzqError(f"no backend for {type(config).__name__}: use one of {known}, or register_backend your own.")


def backend_named(name: str) -> Backend:
    for backend in _BACKENDS.values():
        if backend.name == name:
            return backend
    raise BzqError(f"unknown backend '{name}': use {' or '.join(b.name for b in _BACKENDS.values())}.")


def create_quant_config(backend: str, strict: bool = True, **options):
    """The config of the backend named ``backend`` (``brevitas``, ``pt2e``...) from ``options``.

    With ``strict`` an option the config does not take is refused; without, it is left out (the CLI and recipes
    carry the options of every backend).
    """
    from dataclasses import fields

    cls = backend_named(backend).config_type
    names = {f.name for f in fields(cls)}
    unknown = set(options) - names
    if strict and unknown:
        raise BzqError(f"{cls.__name__} has no setting(s) {', '.join(sorted(unknown))}.")
    return cls(**{k: v for k, v in options.items() if k in names})


def quant_keys() -> dict[str, object]:
    """Every setting a registered backend's config takes from the CLI or a recipe (its scalar fields but the bit
    widths), with its type hint; a name shared by two backends has one meaning."""
    import typing
    from dataclasses import fields

    keys = {}
    for backend in _BACKENDS.values():
        hints = typing.get_type_hints(backend.config_type)
        for f in fields(backend.config_type):
            scalars = {a for a in typing.get_args(hints[f.name]) or (hints[f.name],) if a is not type(None)}
            if f.name not in ("w_bits", "a_bits") and scalars <= {bool, int, float, str}:
                keys[f.name] = hints[f.name]
    return keys


class CalibrationBatches:
    """Image batches from any calibration data, re-iterable (Brevitas GPTQ passes over them once per layer).

    Takes a :class:`CalibrationSet`, one tensor of images (N, C, H, W), any ``Dataset`` of ``(image, label)`` or of
    images, a ``DataLoader``, or any iterable of batches (``(images, labels)`` pairs or image tensors); a one-shot
    iterator is kept in memory.
    """

    def __init__(self, data, batch_size: int = 32):
        from ..synth import CalibrationSet

        if isinstance(data, CalibrationSet):
            data = data.loader(batch_size)
        elif isinstance(data, torch.Tensor):
            if data.dim() != 4:
                raise BzqError(
                    f"a tensor of calibration images must be (N, C, H, W), not of shape {tuple(data.shape)} "
                    "(one image: add the batch dimension, x[None])."
                )
            data = list(data.split(batch_size))
        elif isinstance(data, Dataset):
            data = DataLoader(data, batch_size=batch_size, shuffle=False)
        elif iter(data) is data:  # a generator or iterator: read once, keep
            data = list(data)
        self.data = data
        first = next(iter(self), None)
        if first is None:
            raise BzqError("the calibration data is empty.")
        self.first = first

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self.data:
            images = batch[0] if isinstance(batch, list | tuple) else batch
            if not isinstance(images, torch.Tensor) or images.dim() < 2:
                raise BzqError(
                    f"calibration batches must be image tensors or (images, labels) pairs, not {type(batch).__name__}."
                )
            yield images

    def __len__(self) -> int:
        return len(self.data)

    @property
    def input_size(self) -> tuple[int, ...]:
        return tuple(self.first.shape[1:])

    def example(self, n: int = 2) -> torch.Tensor:
        return self.first[:n].clone()


def as_batches(data, batch_size: int = 32) -> CalibrationBatches:
    return data if isinstance(data, CalibrationBatches) else CalibrationBatches(data, batch_size)
