"""Publishing a quantized output folder to the Hugging Face Hub, with a generated model card.

The token comes from huggingface_hub's usual places (``HF_TOKEN``, ``hf auth login``); it is never passed around,
logged or written here. ``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` work as huggingface_hub documents them.
"""

import json
import os
import shlex
import shutil
import tempfile
from pathlib import Path

from ._errors import BzqError
from .quant import BrevitasConfig
from .quant._api import QUANT_CONFIG, config_from_dict
from .synth._set import MANIFEST, PREVIEW

__all__ = ["model_card", "push_to_hub", "stage_upload"]

RESULTS = "results.json"


def _read(folder: Path, name: str) -> dict:
    path = folder / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise BzqError(f"'{path}' is not valid JSON ({e}); rerun `bzq quantize` to rewrite it.") from None


def _base_model(meta: dict) -> str | None:
    """The Hub id of the float model: an ``hf-hub:`` name, or the pretrained tag timm would download; None when the
    weights came from the user's own checkpoint (a fine-tuned model is not timm's)."""
    name = meta["model"]
    if meta.get("checkpoint"):
        return None
    if name.startswith("hf-hub:"):
        return name[len("hf-hub:") :]
    try:
        import timm

        cfg = timm.models.get_pretrained_cfg(name)
        return getattr(cfg, "hf_hub_id", None) or None
    except Exception:
        return None


def model_card(folder: str | Path, repo_id: str):
    """The ``ModelCard`` for a folder written by ``bzq quantize``: metadata, measured metrics, command, usage."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    folder = Path(folder)
    meta, results = _read(folder, QUANT_CONFIG), _read(folder, RESULTS)
    if not meta:
        raise BzqError(f"'{folder}' is not a quantized model folder ({QUANT_CONFIG} is missing).")
    q = meta["quantization"]
    backend, bits = q["backend"], f"w{q['w_bits']}a{q['a_bits']}"
    base = _base_model(meta)
    evals = []
    if "quantized" in results:
        dataset = Path(results.get("eval_data", "real images")).name
        evals.append(
            EvalResult(
                task_type="image-classification",
                dataset_type="imagefolder",
                dataset_name=f"{dataset} ({results['quantized']['n']} labelled images)",
                metric_type="accuracy",
                metric_name="top-1 accuracy (quantized)",
                metric_value=round(results["quantized"]["top1"], 2),
            )
        )
    data = ModelCardData(
        base_model=base,
        base_model_relation="quantized" if base else None,
        library_name="brevitas-zeroshot",
        pipeline_tag="image-classification",
        tags=["zero-shot-quantization", "data-free", backend, bits, f"int{q['w_bits']}", "timm"],
        license=None,
        model_name=repo_id.split("/")[-1],
        eval_results=evals or None,
    )
    card = ModelCard.from_template(data, template_str=_TEMPLATE, **_card_fields(meta, results, repo_id, base))
    return card


def _weight_solver(q: dict) -> str:
    """The layer-wise rounding solver the saved quantization config ran (the config's own rule for its defaults)."""
    if q.get("backend") != "brevitas" or not (solver := config_from_dict(BrevitasConfig, q).weight_solver):
        return ""
    name = {"gptq": "GPTQ", "gpfq": "GPFQ", "qronos": "Qronos"}[solver]
    return f", {name}" + (" (act_order)" if q.get("gptq_act_order") else "")


def _equalization(q: dict) -> float:
    """SmoothQuant's alpha the saved Brevitas config ran activation equalization with (its rule for the default)."""
    return config_from_dict(BrevitasConfig, q).activation_equalization


def _card_fields(meta: dict, results: dict, repo_id: str, base: str | None) -> dict:
    q, calib = meta["quantization"], meta.get("calibration", {})
    source = calib.get("source") or "unknown"
    if "quantized" in results:
        f, r = results["float"], results["quantized"]
        metrics = (
            "| model | top-1 % | top-5 % | agreement with float % |\n|---|---|---|---|\n"
            f"| float | {f['top1']:.2f} | {f['top5']:.2f} | – |\n"
            f"| quantized | {r['top1']:.2f} | {r['top5']:.2f} | {r.get('agreement', float('nan')):.2f} |\n\n"
            f"Measured on {r['n']} labelled images (`{Path(results.get('eval_data', '?')).name}`). A small "
            "evaluation set: compare the two rows with each other, not with published accuracy."
        )
    else:
        metrics = "Not measured: the model was quantized without `--eval-data`."
    first_last, report = q.get("first_last_bits"), meta.get("report", {})
    scheme = (
        f"{q['backend']}, weights {q['w_bits']}-bit, activations {q['a_bits']}-bit"
        + (f", first/last layer {first_last}-bit" if q["backend"] == "brevitas" and first_last else "")
        + (f", first layer's output {q['first_output_bits']}-bit" if report.get("first_output") else "")
        + (f", depthwise convolutions {q['depthwise_bits']}-bit weights" if q.get("depthwise_bits") else "")
        + (", asymmetric weights (zero points)" if report.get("weight_grid", "").startswith("asym") else "")
        + (f", activation equalization (α {_equalization(q)})" if report.get("act_equalization") else "")
        + _weight_solver(q)
        + (", block reconstruction" if "reconstruction" in report else "")
        + (", bias correction" if report.get("bias_correction", q.get("bias_correction")) else "")
        + (", residual adds not quantized" if report.get("residual_adds_in_float") else "")
    )
    if base:
        origin = f"[{base}](https://huggingface.co/{base})"
    elif meta.get("checkpoint"):
        origin = (
            f"`{meta['model']}` (timm architecture) with weights from the checkpoint `{Path(meta['checkpoint']).name}`"
        )
    else:
        origin = f"`{meta['model']}`"
    n = calib.get("num_images", "?")
    if source in ("gznq", "zeroq") or source.startswith("bn-"):
        described = (
            f"{n} images synthesised from the float model's BatchNorm statistics (source `{source}`, seed "
            f"{calib.get('seed')}); no real image was used"
        )
    elif source == "gaussian":
        described = f"{n} images of Gaussian noise; no real image was used"
    elif source == "real":
        described = f"{n} real images (not published here)"
    else:
        described = f"{n} images from the calibration source `{source}`"
    return {
        "repo_id": repo_id,
        "model": meta["model"],
        "onnx": _onnx_statement(meta),
        "base": origin,
        "scheme": scheme,
        "calibration": described,
        "metrics": metrics,
        "command": public_command(results.get("command")) or "not recorded",
        "files": ", ".join(f"`{v}`{_WHAT.get(v, '')}" for v in meta.get("files", {}).values() if v),
        "versions": ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()),
    }


_WHAT = {  # what each file stores, said plainly on the card
    "model.safetensors": " (the Brevitas state: float32 weights and the quantizers' scales, for `load_quantized`)",
    "model.onnx": " (ONNX QCDQ: 8-bit integer weights, for onnxruntime and other ONNX runtimes)",
    "model.pt2": (
        " (the `torch.export` program with int8 weights; for x86 int8 kernels `import "
        "torchao.quantization.pt2e.quantizer.x86_inductor_quantizer` (it registers the int8 lowering), set "
        "`torch._inductor.config.freezing = True`, then `torch.compile` the loaded program and run it under "
        "`torch.no_grad()`)"
    ),
}


def _onnx_statement(meta: dict) -> str:
    """What the card says of ``model.onnx``: its measured parity with the quantized PyTorch model."""
    if "onnx" not in meta.get("files", {}) or not meta["files"]["onnx"]:
        return ""
    parity = meta.get("report", {}).get("onnx_parity")
    if parity is None:
        return "\n`model.onnx` (ONNX QCDQ) was **not checked** against the quantized PyTorch model.\n"
    verdict = "matches" if parity.get("passed") else "**does not match**"
    weights = {
        "int8": "int8 weights: onnxruntime's fast u8 x s8 kernels, exact on x86 CPUs with VNNI; on x86 CPUs without "
        "VNNI they saturate, so re-export for those with `--set onnx_int8_weights=false`",
        "uint8": "uint8 weights with zero point 128: exact u8 x u8 kernels on every x86 CPU; on CPUs with VNNI "
        "`--set onnx_int8_weights=true` exports faster int8 ones",
    }.get(meta.get("report", {}).get("onnx_weights", "uint8"))
    return (
        f"\n`model.onnx` (ONNX QCDQ; {weights}) {verdict} the quantized PyTorch model in "
        f"{parity.get('runtime', 'onnxruntime')} on {parity.get('images')} calibration images: predicted class "
        f"agreement {parity.get('agreement')} %, median / max |difference| {parity.get('median_abs_diff')} / "
        f"{parity.get('max_abs_diff')} logits (largest logit {parity.get('max_abs_logit')}; the PyTorch model's own "
        f"change under float-rounding-sized input changes: {parity.get('rounding_sensitivity', 'not measured')}).\n"
    )


_TEMPLATE = """---
{{ card_data }}
---

# {{ repo_id }}

A post-training quantized version of {{ base }}, made with
[brevitas-zeroshot](https://pypi.org/project/brevitas-zeroshot/): **{{ scheme }}**.

Calibration: {{ calibration }}.

## Accuracy

{{ metrics }}

## How it was made

```
{{ command }}
```

Files: {{ files }}, `quant_config.json` (the full quantization config), `calibration/` (the synthetic set's
manifest and a preview grid; the images themselves are not included). Library versions: {{ versions }}.
{{ onnx }}
## How to load it

```python
from brevitas_zeroshot.quant import load_quantized

model, data_config = load_quantized("hf-hub:{{ repo_id }}")  # data_config: input size, mean, std
```

## Limitations

Post-training quantization changes the model's predictions on some inputs (see the agreement column). The
accuracy above was measured on a small labelled sample; measure on your own data before relying on it.
"""

_PUBLISHED = ("model.safetensors", "model.onnx", "model.pt2")
_CARD = "README.md"


def public_command(command: str | None) -> str | None:
    """``command`` with every local path cut to its last part: a card must not publish the user's folders."""
    if not command:
        return command
    parts = []
    for arg in shlex.split(command):
        key, sep, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if os.sep in value or value.startswith("~"):
            value = Path(value).name or value
        parts.append(f"{key}{sep}{value}" if sep else value)
    return shlex.join(parts)


def _public_records(folder: Path) -> dict[str, dict]:
    """quant_config.json and results.json as published: local paths cut to file names."""
    meta, results = _read(folder, QUANT_CONFIG), _read(folder, RESULTS)
    if meta.get("checkpoint"):
        meta["checkpoint"] = Path(meta["checkpoint"]).name
    if results.get("command"):
        results["command"] = public_command(results["command"])
    if results.get("eval_data"):
        results["eval_data"] = Path(results["eval_data"]).name
    return {QUANT_CONFIG: meta, **({RESULTS: results} if results else {})}


def _is_own_stage(stage: Path) -> bool:
    """Whether ``stage`` holds only what an earlier ``stage_upload`` wrote (so it may be replaced)."""
    allowed = {*_PUBLISHED, QUANT_CONFIG, RESULTS, _CARD, "calibration"}
    if {p.name for p in stage.iterdir()} - allowed or not (stage / _CARD).is_file():
        return False
    calib = stage / "calibration"
    if calib.exists() and (not calib.is_dir() or {p.name for p in calib.iterdir()} - {MANIFEST, PREVIEW}):
        return False
    return "brevitas-zeroshot" in (stage / _CARD).read_text(errors="replace")


def _check_onnx(folder: Path, meta: dict, allow_unchecked: bool) -> None:
    """Refuse a ``model.onnx`` whose parity with the quantized model failed or was never checked."""
    if not (folder / "model.onnx").exists() or allow_unchecked:
        return
    parity = meta.get("report", {}).get("onnx_parity")
    if parity is None:
        problem = "was never checked against the quantized model (made by an earlier bzq)"
    elif not parity.get("passed"):
        problem = (
            f"failed its parity check (top-1 agreement {parity.get('agreement')} %, median |diff| "
            f"{parity.get('median_abs_diff')} logits)"
        )
    else:
        return
    raise BzqError(
        f"'{folder / 'model.onnx'}' {problem}; rerun `bzq quantize`, or pass --allow-unchecked-onnx to publish it "
        "anyway (the card will say so)."
    )


def stage_upload(folder: str | Path, stage: str | Path, repo_id: str, allow_unchecked_onnx: bool = False) -> list[Path]:
    """Write into ``stage`` exactly what ``push_to_hub`` uploads; returns the files, relative to ``stage``.

    An existing ``stage`` is replaced only when it holds nothing but an earlier upload staged by bzq. A
    ``model.onnx`` that failed (or never had) its parity check is refused unless ``allow_unchecked_onnx``.
    """
    folder, stage = Path(folder), Path(stage)
    card = model_card(folder, repo_id)  # fails on a folder that is not a quantized model before anything is written
    _check_onnx(folder, _read(folder, QUANT_CONFIG), allow_unchecked_onnx)
    if stage.exists() and not (stage.is_dir() and _is_own_stage(stage)):
        raise BzqError(
            f"'{stage}' exists and holds files bzq did not stage; bzq never replaces files it did not write: "
            "move it away, or stage elsewhere."
        )
    tmp = stage.with_name(f".{stage.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "calibration").mkdir(parents=True)
        for name in _PUBLISHED:
            if (folder / name).exists():
                shutil.copy2(folder / name, tmp / name)
        for name, record in _public_records(folder).items():
            (tmp / name).write_text(json.dumps(record, indent=2))
        for name in (MANIFEST, PREVIEW):  # never the shards: only the description of the set and a preview
            if (folder / "calibration" / name).exists():
                shutil.copy2(folder / "calibration" / name, tmp / "calibration" / name)
        card.save(tmp / _CARD)
        if stage.exists():
            shutil.rmtree(stage)
        tmp.rename(stage)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(p.relative_to(stage) for p in stage.rglob("*") if p.is_file())


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    dry_run: bool = False,
    stage: str | Path | None = None,
    allow_unchecked_onnx: bool = False,
) -> str:
    """Publish a ``bzq quantize`` folder to ``repo_id``; returns the commit URL (or, with ``dry_run``, the stage).

    A failure (network, permissions) leaves ``folder`` as it was and says so.
    """
    folder = Path(folder)
    if dry_run:
        target = Path(stage) if stage else folder.with_name(folder.name + ".hub")
        stage_upload(folder, target, repo_id, allow_unchecked_onnx)
        return str(target)
    from huggingface_hub import create_repo, upload_folder

    with tempfile.TemporaryDirectory(prefix="bzq-push-") as tmp:
        stage_upload(folder, Path(tmp) / "upload", repo_id, allow_unchecked_onnx)
        try:
            create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            commit = upload_folder(
                repo_id=repo_id,
                folder_path=Path(tmp) / "upload",
                commit_message=f"Upload {repo_id} (brevitas-zeroshot)",
            )
        except Exception as e:
            raise BzqError(
                f"upload to '{repo_id}' failed ({type(e).__name__}: {_redact(str(e).splitlines()[0] if str(e) else '')}"
                f"); '{folder}' is unchanged, rerun `bzq push` when the Hub is reachable."
            ) from None
    return str(getattr(commit, "commit_url", commit))


def _redact(text: str) -> str:
    from huggingface_hub import get_token

    token = get_token()
    return text.replace(token, "***") if token else text
