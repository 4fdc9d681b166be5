import platform
import sys

import torch
from tqdm.auto import tqdm


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on: the one asked for, else CUDA when present, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def progress(iterable=None, **kwargs) -> tqdm:
    """A progress bar on stderr, so stdout stays clean for ``--json``; none when stderr is not a terminal (a
    redirected log would fill with carriage-return frames)."""
    kwargs["disable"] = kwargs.get("disable", False) or not sys.stderr.isatty()
    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, leave=False, **kwargs)


def library_versions() -> dict:
    """Versions recorded beside every artefact (synthetic sets, quantized models)."""
    import timm

    from .version import __version__

    return {
        "brevitas_zeroshot": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }
