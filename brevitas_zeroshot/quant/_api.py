"""One verb per step for both backends: ``quantize``, ``save_quantized``, ``load_quantized``."""

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .._errors import BzqError
from .._utils import library_versions
from ..synth import SyntheticSet
from ._brevitas import BrevitasConfig, build_quant_model, quantize_brevitas
from ._pt2e import PT2EConfig, export_program, quantize_pt2e

__all__ = ["quantize", "save_quantized", "load_quantized", "QUANT_CONFIG"]

QUANT_CONFIG = "quant_config.json"


def quantize(model: nn.Module, calib: SyntheticSet, config: BrevitasConfig | PT2EConfig) -> tuple[nn.Module, dict]:
    """Quantize a copy of the float ``model`` with the backend ``config`` names, calibrated on ``calib``."""
    if isinstance(config, BrevitasConfig):
        return quantize_brevitas(model, calib, config)
    if isinstance(config, PT2EConfig):
        return quantize_pt2e(model, calib, config)
    raise BzqError(f"unknown quantization config {type(config).__name__}: use BrevitasConfig or PT2EConfig.")


def _config_dict(config: BrevitasConfig | PT2EConfig, report: dict) -> dict:
    if isinstance(config, BrevitasConfig):  # the graph mode actually used, so a reload rebuilds the same model
        return {"backend": "brevitas", **asdict(config), "graph": report.get("graph") or config.graph}
    d = {k: v for k, v in asdict(config).items() if k != "quantizer"}
    return {"backend": "pt2e", **d, "quantizer": type(config.quantizer).__name__ if config.quantizer else None}


def save_quantized(
    qmodel: nn.Module,
    out: str | Path,
    *,
    model_name: str,
    config: BrevitasConfig | PT2EConfig,
    data_config: dict,
    calib: SyntheticSet,
    report: dict,
    checkpoint: str | Path | None = None,
    export_onnx: bool = True,
) -> Path:
    """Write the quantized model, its JSON config, the calibration set's manifest and an export to ``out``."""
    from ..synth._set import MANIFEST, save_preview

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    example = calib.example_inputs(2)[0].to(next(iter(qmodel.parameters()), torch.empty(0)).device)
    files = {}
    if isinstance(config, BrevitasConfig):
        from safetensors.torch import save_file

        # Brevitas shares scale parameters between quantizers; the file keeps a copy under every name.
        state = {k: v.detach().cpu().clone().contiguous() for k, v in qmodel.state_dict().items()}
        save_file(state, str(out / "model.safetensors"))
        files["weights"] = "model.safetensors"
        if export_onnx:
            files["onnx"] = _export_onnx(qmodel, example, out / "model.onnx", report)
    else:
        torch.export.save(export_program(qmodel, example), str(out / "model.pt2"))
        files["program"] = "model.pt2"
    calib_meta = {k: v for k, v in calib.meta.items() if k != "folder"}  # never a path to real data
    calib_dir = out / "calibration"
    if not (calib_dir / MANIFEST).exists():  # a set synthesised into OUT/calibration already has its own
        calib_dir.mkdir(exist_ok=True)
        (calib_dir / MANIFEST).write_text(json.dumps(calib_meta, indent=2))
        if calib_meta.get("source") != "real":
            save_preview(calib.images, calib.meta, calib_dir / "preview.png")
    meta = {
        "format_version": 1,
        "model": model_name,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "quantization": _config_dict(config, report),
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
        "calibration": {
            "source": calib_meta.get("source"),
            "num_images": len(calib),
            "seed": calib_meta.get("seed"),
            "fingerprint": calib_meta.get("fingerprint"),
        },
        "report": report,
        "files": files,
        "versions": library_versions(),
    }
    tmp = out / (QUANT_CONFIG + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / QUANT_CONFIG)
    return out


def _export_onnx(qmodel: nn.Module, example: torch.Tensor, path: Path, report: dict) -> str | None:
    """ONNX QCDQ export; a failure is reported, not fatal (the safetensors state is the reference)."""
    try:
        from brevitas.export import export_onnx_qcdq

        export_onnx_qcdq(qmodel.cpu(), args=example.cpu()[:1], export_path=str(path), opset_version=17, dynamo=False)
        return path.name
    except Exception as e:  # onnx missing, or an operator the exporter does not know
        report.setdefault("notes", []).append(f"ONNX export failed: {type(e).__name__}: {str(e)[:200]}")
        if path.exists():
            path.unlink()
        return None


def load_quantized(source: str | Path, device: str | torch.device | None = None) -> tuple[nn.Module, dict]:
    """Reload a model written by ``save_quantized`` (a folder, or ``hf-hub:USER/NAME``) with its data config."""
    from ..models import load_model

    folder = _resolve(source)
    try:
        meta = json.loads((folder / QUANT_CONFIG).read_text())
    except FileNotFoundError:
        raise BzqError(f"'{folder}' is not a quantized model folder ({QUANT_CONFIG} is missing).") from None
    q = dict(meta["quantization"])
    backend = q.pop("backend")
    data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["data_config"].items()}
    if backend == "pt2e":
        from torchao.quantization.pt2e import allow_exported_model_train_eval

        model = torch.export.load(str(folder / meta["files"]["program"])).module()
        allow_exported_model_train_eval(model)
    else:
        from brevitas.graph.calibrate import load_quant_model_mode
        from safetensors.torch import load_file

        float_model, _ = load_model(meta["model"], pretrained=False)
        model, _ = build_quant_model(float_model, BrevitasConfig(**q), tuple(data_config["input_size"]))
        with load_quant_model_mode(model):
            model.load_state_dict(load_file(str(folder / meta["files"]["weights"])))
        model.eval()
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


def prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse to mix results with a different run: an existing quantized folder is replaced only on request.

    ``calibration/`` is left alone: a synthetic set there is reused when it matches and replaced when it does not.
    """
    if (out / QUANT_CONFIG).exists() and not overwrite:
        raise BzqError(f"'{out}' already holds a quantized model; choose another --out or pass --overwrite.")
    for name in (QUANT_CONFIG, "model.safetensors", "model.onnx", "model.pt2", "results.json"):
        if (out / name).exists():
            (out / name).unlink()
