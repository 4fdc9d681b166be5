"""One verb per step, for every registered backend: ``quantize``, ``save_quantized``, ``load_quantized``."""

import json
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from .._errors import BzqError, first_line
from .._files import WRITER, read_own_record, write_atomic
from .._utils import library_versions, releases_memory
from ..synth import CalibrationSet
from ._registry import as_batches, backend_for, backend_named

__all__ = ["quantize", "save_quantized", "load_quantized", "lower_quantized", "QUANT_CONFIG"]

QUANT_CONFIG = "quant_config.json"


@releases_memory
def quantize(model: nn.Module, calibration, config) -> tuple[nn.Module, dict]:
    """Quantize a copy of the float ``model`` with the backend registered for ``type(config)``.

    ``calibration`` is a :class:`CalibrationSet`, any ``Dataset`` of ``(image, label)``, a ``DataLoader`` of real
    images, or any iterable of image batches.
    """
    backend = backend_for(config)
    return backend.quantize(model, as_batches(calibration, getattr(config, "calib_batch_size", 32)), config)


def lower_quantized(qmodel: nn.Module, backend: str, example: torch.Tensor) -> tuple[nn.Module, str]:
    """``qmodel`` as it runs when deployed, and the name of that runtime: a PT2E program compiled by Inductor (its
    int8 kernels); a backend with no compiled form (Brevitas: its deployable form is ``model.onnx``) as it is.

    ``example`` (a batch) runs once, so a compilation that fails does so here; then the eager model is returned and
    the runtime says why.
    """
    lower = backend_named(backend).lower
    if lower is None:
        return qmodel, "pytorch (eager)"
    return lower(qmodel, example)


def _config_dict(config, report: dict) -> dict:
    """The config as JSON: values JSON cannot hold (a Quantizer object) by their type name; the graph mode actually
    used, so a reload rebuilds the same model."""
    values = asdict(config) if is_dataclass(config) else dict(vars(config))
    for k, v in values.items():
        try:
            json.dumps(v)
        except TypeError:
            values[k] = type(v).__name__
    if "graph" in values and report.get("graph"):
        values["graph"] = report["graph"]
    return {"backend": backend_for(config).name, **values}


def config_from_dict(config_type: type, values: dict):
    """Rebuild a config saved by ``_config_dict`` (fields it does not know are left out)."""
    names = {f.name for f in fields(config_type)}
    return config_type(**{k: v for k, v in values.items() if k in names})


def save_quantized(
    qmodel: nn.Module,
    out: str | Path,
    *,
    model_name: str,
    config,
    data_config: dict,
    calib,
    report: dict,
    checkpoint: str | Path | None = None,
    export_onnx: bool = True,
    write_calibration: bool = True,
) -> Path:
    """Write the quantized model (the backend's files), ``quant_config.json`` and the calibration set's manifest.

    ``qmodel`` itself is left as it is. An export that fails, or whose parity check with ``qmodel`` fails, is
    recorded in ``report["failed_steps"]``; one that cannot run (a package missing) in ``report["notes"]``.
    """
    from ..synth._set import MANIFEST, save_preview, write_manifest

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    batches = as_batches(calib)
    # up to 32 calibration images: the export's example, and the images an export's parity is checked on
    example = batches.example(32).to(next(iter(qmodel.parameters()), torch.empty(0)).device)
    files = backend_for(config).save(qmodel, out, example, report, export_onnx)
    calib_meta = {k: v for k, v in getattr(calib, "meta", {}).items() if k != "folder"}  # never a path to real data
    calib_meta.setdefault("source", "user data")
    calib_dir = out / "calibration"
    if write_calibration and not (calib_dir / MANIFEST).exists():  # a set synthesised there has its own
        calib_dir.mkdir(exist_ok=True)
        write_manifest(calib_dir, calib_meta)
        if isinstance(calib, CalibrationSet) and calib_meta.get("source") != "real":
            save_preview(calib.images, calib.meta, calib_dir / "preview.png")
    meta = {
        "format_version": 1,
        "writer": WRITER,
        "model": model_name,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "quantization": _config_dict(config, report),
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
        "calibration": {
            "source": calib_meta.get("source"),
            "num_images": _count(calib),
            "seed": calib_meta.get("seed"),
            "fingerprint": calib_meta.get("fingerprint"),
        },
        "report": report,
        "files": files,
        "versions": library_versions(),
    }
    write_atomic(out / QUANT_CONFIG, lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    return out


def _count(calib) -> int | None:
    """Images in the calibration data, where it says."""
    data = getattr(calib, "dataset", calib)  # a DataLoader's length counts batches
    return len(data) if isinstance(data, Dataset) and hasattr(data, "__len__") else None


def load_quantized(source: str | Path, device: str | torch.device | None = None) -> tuple[nn.Module, dict]:
    """Reload a model written by ``save_quantized`` (a folder, or ``hf-hub:USER/NAME``) with its data config."""
    folder = _resolve(source)
    meta = read_own_record(folder / QUANT_CONFIG, ("format_version", "quantization", "files"))
    if meta is None:
        raise BzqError(f"'{folder}' is not a quantized model folder ({QUANT_CONFIG} is missing).")
    try:
        return _load(folder, meta, device)
    except BzqError:
        raise
    except Exception as e:  # a damaged or truncated file, a config from another version
        files = ", ".join(str(folder / f) for f in meta.get("files", {}).values() if f)
        raise BzqError(
            f"cannot load the quantized model in '{folder}' ({files}, {QUANT_CONFIG}): {type(e).__name__}: "
            f"{first_line(e)}; rerun `bzq quantize` to rewrite it."
        ) from e


def _load(folder: Path, meta: dict, device) -> tuple[nn.Module, dict]:
    data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["data_config"].items()}
    model = backend_named(meta["quantization"]["backend"]).load(folder, meta)
    model.eval()  # an exported program's eval() returns None
    if device is not None:
        model.to(device)
    model.bzq_meta = meta
    return model, data_config


def _resolve(source: str | Path) -> Path:
    text = str(source)
    if text.startswith("hf-hub:"):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(text[len("hf-hub:") :]))
        except Exception as e:
            raise BzqError(f"could not download '{text}' from the Hugging Face Hub: {type(e).__name__}: {e}") from e
    folder = Path(source)
    if not folder.is_dir():
        raise BzqError(f"'{folder}' is not a folder.")
    return folder
