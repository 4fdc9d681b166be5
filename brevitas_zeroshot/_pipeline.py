"""The end-to-end quantization run behind `bzq quantize` and `bzq recipe run`.

Check every input, load, make the calibration set, quantize, save, evaluate, write results.json: all of it into
``OUT/.bzq-partial`` (resumable synthesis included), moved into ``OUT`` only once complete. A failure leaves ``OUT``
as it was; a failed optional step (ONNX export, evaluation) is recorded in results.json under ``failed_steps``.
"""

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from ._errors import BzqError
from ._files import STAGING, read_own_record, refuse_foreign, swap_in, write_atomic
from .quant._api import QUANT_CONFIG
from .synth import SynthesisConfig

__all__ = ["OUTPUT_FILES", "RESULTS", "SYNTHESIS_KEYS", "PipelineConfig", "check_output", "run_pipeline"]

RESULTS = "results.json"
OUTPUT_FILES = ("model.safetensors", "model.onnx", "model.pt2", RESULTS)  # beside quant_config.json and calibration/
_SYNTHESISED = ("gznq", "zeroq")  # sources that stream a resumable set into a folder


@dataclass
class PipelineConfig:
    """Everything `bzq quantize` does, as one value; a recipe is a saved instance (flat YAML of these fields, with
    the ``quant`` and ``synthesis`` settings as top-level keys named as in the backend's config and
    :class:`SynthesisConfig`)."""

    model: str
    out: Path
    backend: str = "brevitas"
    w_bits: int = 8
    a_bits: int = 8
    calib: str = "gznq"
    checkpoint: Path | None = None
    images: int = 128
    seed: int = 0
    eval_data: Path | None = None
    eval_limit: int | None = None
    onnx: bool = True  # brevitas: ONNX QCDQ export
    overwrite: bool = False
    device: str = "auto"
    quant: dict = field(default_factory=dict)  # the backend's config fields (BrevitasConfig, PT2EConfig...)
    synthesis: dict = field(default_factory=dict)  # SynthesisConfig fields for gznq/zeroq (iterations, lr...)

    def __post_init__(self) -> None:
        from .quant._registry import quant_keys

        self.out = Path(self.out)
        settings = (("synthesis", self.synthesis, SYNTHESIS_KEYS), ("quantization", self.quant, set(quant_keys())))
        for what, given, known in settings:
            unknown = set(given) - known
            if unknown:
                raise BzqError(f"unknown {what} setting(s): {', '.join(sorted(unknown))}.")
        SynthesisConfig(**self.synthesis)  # impossible settings fail here, before any work
        self.quant_config()

    def quant_config(self):
        """The backend's config (``BrevitasConfig``, ``PT2EConfig``...) from ``quant`` (the settings it takes)."""
        from .quant._registry import create_quant_config

        options = dict(self.quant)
        if options.get("first_last_bits") == 0:  # the CLI's and recipes' spelling of "as the rest"
            options["first_last_bits"] = None
        return create_quant_config(self.backend, strict=False, w_bits=self.w_bits, a_bits=self.a_bits, **options)


# Synthesis settings a pipeline (and a recipe) may set: every SynthesisConfig field but those the pipeline names.
SYNTHESIS_KEYS = {f.name for f in fields(SynthesisConfig)} - {"num_images", "seed"}


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
    from .synth._set import CalibrationSet, SetMismatch, own_manifest
    from .synth._sources import check_source, create_calibration_set

    final, staged = out / "calibration", out / STAGING / "calibration"
    kind = check_source(calib)
    if kind == "set" and Path(calib).resolve() == final.resolve():
        return CalibrationSet.load(final, model=net, data_config=data_config), True
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


def run_pipeline(config: PipelineConfig, command: str | None = None) -> dict:
    """Quantize ``config.model`` into ``config.out`` (see the module docstring); returns what results.json holds.

    ``command`` (the exact command line or recipe) is recorded in results.json and the model card.
    """
    from ._evaluate import evaluate
    from ._utils import resolve_device
    from .data import create_loader
    from .models import load_model
    from .quant import lower_quantized, save_quantized
    from .quant import quantize as quantize_model
    from .synth._sources import check_source

    c, out = config, config.out
    quant_config = c.quant_config()
    old = check_output(out, c.overwrite)
    check_source(c.calib)
    dev = resolve_device(c.device)
    net, data_config = load_model(c.model, checkpoint=c.checkpoint)
    net.to(dev)
    loader = create_loader(c.eval_data, data_config, limit=c.eval_limit) if c.eval_data is not None else None
    staging = out / STAGING
    if staging.is_dir():  # a previous run's leftovers: keep only its resumable synthesis
        for entry in staging.iterdir():
            if entry.name != "calibration":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    with _no_empty_folders_on_failure(staging, out):
        staging.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        calib_set, in_place = _calibration(
            c.calib, net, data_config, out, c.overwrite, num_images=c.images, seed=c.seed, device=dev, **c.synthesis
        )
        t1 = time.perf_counter()
        qmodel, report = quantize_model(net, calib_set, quant_config)
        t2 = time.perf_counter()
        save_quantized(
            qmodel,
            staging,
            model_name=c.model,
            config=quant_config,
            data_config=data_config,
            calib=calib_set,
            report=report,
            checkpoint=c.checkpoint,
            export_onnx=c.onnx,
            write_calibration=not in_place,
        )
        result = {
            "model": c.model,
            "backend": c.backend,
            "w_bits": c.w_bits,
            "a_bits": c.a_bits,
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
            result["eval_data"] = str(c.eval_data)
            try:
                result["float"] = evaluate(net, loader, device=dev)
                runnable, runtime = lower_quantized(qmodel, c.backend, next(iter(loader))[0].to(dev))
                result["quantized"] = {**evaluate(runnable, loader, reference=net, device=dev), "runtime": runtime}
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
