"""One verb per step for both backends: ``quantize``, ``save_quantized``, ``load_quantized``."""

import copy
import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .._errors import BzqError
from .._files import WRITER, read_own_record, write_atomic
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
    write_calibration: bool = True,
) -> Path:
    """Write the quantized model, its JSON config, the calibration set's manifest and an export to ``out``.

    ``qmodel`` itself is left as it is (the ONNX export works on a copy). An ONNX export that fails is recorded in
    ``report["failed_steps"]``; one that cannot run (no ``onnx`` installed) in ``report["notes"]``.
    """
    from ..synth._set import MANIFEST, save_preview, write_manifest

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    example = calib.example_inputs(2)[0].to(next(iter(qmodel.parameters()), torch.empty(0)).device)
    files = {}
    if isinstance(config, BrevitasConfig):
        from safetensors.torch import save_file

        # Brevitas shares scale parameters between quantizers; the file keeps a copy under every name.
        state = {k: v.detach().cpu().clone().contiguous() for k, v in qmodel.state_dict().items()}
        write_atomic(out / "model.safetensors", lambda tmp: save_file(state, str(tmp)))
        files["weights"] = "model.safetensors"
        if export_onnx:
            files["onnx"] = _export_onnx(qmodel, example, out / "model.onnx", report)
    else:
        program = export_program(qmodel, example)
        write_atomic(out / "model.pt2", lambda tmp: torch.export.save(program, str(tmp)))
        files["program"] = "model.pt2"
    calib_meta = {k: v for k, v in calib.meta.items() if k != "folder"}  # never a path to real data
    calib_dir = out / "calibration"
    if write_calibration and not (calib_dir / MANIFEST).exists():  # a set synthesised there has its own
        calib_dir.mkdir(exist_ok=True)
        write_manifest(calib_dir, calib_meta)
        if calib_meta.get("source") != "real":
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
            "num_images": len(calib),
            "seed": calib_meta.get("seed"),
            "fingerprint": calib_meta.get("fingerprint"),
        },
        "report": report,
        "files": files,
        "versions": library_versions(),
    }
    write_atomic(out / QUANT_CONFIG, lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    return out


def _export_onnx(qmodel: nn.Module, example: torch.Tensor, path: Path, report: dict) -> str | None:
    """ONNX QCDQ export of a CPU copy of ``qmodel``; a failure is recorded, not raised (the safetensors state is the
    reference), and leaves no file."""
    try:
        from brevitas.export import export_onnx_qcdq
    except ImportError as e:
        report.setdefault("notes", []).append(
            f"ONNX export skipped: {e} (pip install 'brevitas-zeroshot[export]', or pass --no-onnx)"
        )
        return None
    try:
        model = copy.deepcopy(qmodel).cpu()
        write_atomic(
            path,
            lambda tmp: export_onnx_qcdq(
                model, args=example.cpu()[:1], export_path=str(tmp), opset_version=17, dynamo=False
            ),
        )
        return path.name
    except Exception as e:  # an operator the exporter does not know, a full disk...
        report.setdefault("failed_steps", []).append(f"ONNX export: {type(e).__name__}: {str(e)[:200]}")
        return None


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
            f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}; rerun `bzq quantize` to rewrite it."
        ) from e


def _load(folder: Path, meta: dict, device) -> tuple[nn.Module, dict]:
    from ..models import load_model

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
