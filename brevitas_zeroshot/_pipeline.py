"""The end-to-end quantization run behind `bzq quantize` and `bzq recipe run`.

Check every input, load, make the calibration set, quantize, save, evaluate, write results.json: all of it into
``OUT/.bzq-partial`` (resumable synthesis included), moved into ``OUT`` only once complete. A failure leaves ``OUT``
as it was; a failed optional step (ONNX export, evaluation) is recorded in results.json under ``failed_steps``.
"""

import contextlib
import json
import shutil
import time
from pathlib import Path

from ._errors import BzqError
from ._files import STAGING, read_own_record, refuse_foreign, swap_in, write_atomic
from .quant._api import QUANT_CONFIG

__all__ = ["OUTPUT_FILES", "RESULTS", "check_output", "make_quant_config", "run_quantize"]

RESULTS = "results.json"
OUTPUT_FILES = ("model.safetensors", "model.onnx", "model.pt2", RESULTS)  # beside quant_config.json and calibration/
_SYNTHESISED = ("gznq", "zeroq")  # sources that stream a resumable set into a folder


def make_quant_config(o: dict):
    """The backend config named by ``bzq quantize`` options (raises on impossible settings, before any work)."""
    from .quant import BrevitasConfig, PT2EConfig

    if o["backend"] == "brevitas":
        return BrevitasConfig(
            w_bits=o["w_bits"],
            a_bits=o["a_bits"],
            first_last_bits=o["first_last_bits"] or None,
            gptq=o["gptq"],
            gpfq=o["gpfq"],
            bias_correction=o["bias_correction"],
            graph=o["graph"],
        )
    if o["backend"] == "pt2e":
        return PT2EConfig(w_bits=o["w_bits"], a_bits=o["a_bits"], target=o["target"])
    raise BzqError(f"unknown backend '{o['backend']}': use brevitas or pt2e.")


def check_output(out: Path, overwrite: bool) -> dict | None:
    """Refuse an output folder this run may not write into; returns the record of the model bzq wrote there."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BzqError(f"--out '{out}' is a file, not a folder.")
    old = read_own_record(out / QUANT_CONFIG, ("format_version", "quantization", "files"))
    if old is not None and not overwrite:
        raise BzqError(f"'{out}' already holds a quantized model; choose another --out or pass --overwrite.")
    if old is None and out.is_dir():
        refuse_foreign(out, OUTPUT_FILES, f"was not written by bzq (there is no {QUANT_CONFIG} of bzq's beside it)")
    calib = out / "calibration"
    if calib.is_dir():
        from .synth._set import own_manifest

        if own_manifest(calib) is None and any(calib.iterdir()):
            raise BzqError(f"'{calib}' holds files bzq did not write; choose another --out.")
    return old


def _calibration(calib: str, net, data_config, out: Path, overwrite: bool, **kwargs):
    """The calibration set, and whether it lives in ``OUT/calibration`` already (reused, not replaced).

    A set there is reused when it is the one this run asks for, replaced (at the end) only with ``overwrite``.
    """
    from .synth._set import SetMismatch, SyntheticSet, own_manifest
    from .synth._sources import check_source, create_calibration_set

    final, staged = out / "calibration", out / STAGING / "calibration"
    kind = check_source(calib)
    if kind == "set" and Path(calib).resolve() == final.resolve():
        return SyntheticSet.load(final, model=net, data_config=data_config), True
    existing = own_manifest(final) if final.is_dir() else None
    if calib in _SYNTHESISED and existing is not None:
        try:  # the same set: reused, or resumed, in place
            return create_calibration_set(calib, net, data_config, out=final, **kwargs), True
        except SetMismatch:
            pass
    if existing is not None and not overwrite:
        raise BzqError(
            f"'{final}' holds another calibration set ({existing.get('source')}, seed {existing.get('seed')}); pass "
            "--overwrite to replace it once this run is complete, or choose another --out."
        )
    if calib in _SYNTHESISED:
        return create_calibration_set(calib, net, data_config, out=staged, overwrite=True, **kwargs), False
    return create_calibration_set(calib, net, data_config, **kwargs), False


def run_quantize(
    model: str,
    config,
    calib: str,
    out: Path,
    *,
    checkpoint: Path | None = None,
    images: int = 128,
    seed: int = 0,
    eval_data: Path | None = None,
    eval_limit: int | None = None,
    device: str = "auto",
    export_onnx: bool = True,
    overwrite: bool = False,
    command: str | None = None,
    **synthesis,
) -> dict:
    """Quantize ``model`` into ``out`` (see the module docstring); returns what results.json holds."""
    from ._evaluate import evaluate
    from ._utils import resolve_device
    from .data import create_loader
    from .models import load_model
    from .quant import PT2EConfig, save_quantized
    from .quant import quantize as quantize_model
    from .synth._sources import check_source

    out = Path(out)
    old = check_output(out, overwrite)
    check_source(calib)
    dev = resolve_device(device)
    net, data_config = load_model(model, checkpoint=checkpoint)
    net.to(dev)
    loader = create_loader(eval_data, data_config, limit=eval_limit) if eval_data is not None else None
    staging = out / STAGING
    if staging.is_dir():  # a previous run's leftovers: keep only its resumable synthesis
        for entry in staging.iterdir():
            if entry.name != "calibration":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    with _no_empty_folders_on_failure(staging, out):
        staging.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        calib_set, in_place = _calibration(
            calib, net, data_config, out, overwrite, num_images=images, seed=seed, device=dev, **synthesis
        )
        t1 = time.perf_counter()
        qmodel, report = quantize_model(net, calib_set, config)
        t2 = time.perf_counter()
        save_quantized(
            qmodel,
            staging,
            model_name=model,
            config=config,
            data_config=data_config,
            calib=calib_set,
            report=report,
            checkpoint=checkpoint,
            export_onnx=export_onnx,
            write_calibration=not in_place,
        )
        result = {
            "model": model,
            "backend": "pt2e" if isinstance(config, PT2EConfig) else "brevitas",
            "w_bits": config.w_bits,
            "a_bits": config.a_bits,
            "calibration": {
                "source": calib_set.meta.get("source"),
                "images": len(calib_set),
                "seed": calib_set.meta.get("seed"),
            },
            "report": report,
            "seconds": {"calibration_set": round(t1 - t0, 2), "quantization": round(t2 - t1, 2)},
            "command": command,
            "failed_steps": list(report.pop("failed_steps", [])),
        }
        if loader is not None:
            result["eval_data"] = str(eval_data)
            try:
                result["float"] = evaluate(net, loader, device=dev)
                result["quantized"] = evaluate(qmodel, loader, reference=net, device=dev)
            except BzqError as e:  # e.g. an unreadable image: the model is still good, the scores are not there
                result.pop("float", None)
                result["failed_steps"].append(f"evaluation: {e}")
        write_atomic(staging / RESULTS, lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
        old_files = [*(old or {}).get("files", {}).values(), QUANT_CONFIG, RESULTS] if old else []
        swap_in(staging, out, [f for f in old_files if f], QUANT_CONFIG)
    return result


@contextlib.contextmanager
def _no_empty_folders_on_failure(*folders: Path):
    """On failure, remove those of ``folders`` this run created that are still empty (nothing worth keeping)."""
    made = [f for f in folders if not f.exists()]
    try:
        yield
    except BaseException:
        for folder in made:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
