"""`bzq bench quality`: quantized top-1 on held-out real images, per calibration source, under one quantizer.

Every (task, scheme, source, seed) cell is written to its own JSON file as soon as it is done, and every
calibration set is saved, so an interrupted run resumes where it stopped and a second scheme reuses the sets.

A set that is not made of the task's real images is the same for every task of one model (the ImageNet models'
tuning and held-out splits differ only in their real images), so a task reuses such a set made for another, and,
where that task kept its quantized models (``keep_models``), the model too: a held-out check of a data-free cell
then costs an evaluation, not a quantization.
"""

import contextlib
import itertools
import json
import logging
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import torch
import yaml

from .._errors import BzqError
from .._evaluate import evaluate
from .._files import read_own_record, write_atomic
from .._utils import library_versions, machine, resolve_device
from ..data import create_loader
from ..models import load_model
from ..quant import load_quantized, quantize, save_quantized
from ..quant._api import _config_dict
from ..quant._registry import backend_for, create_quant_config
from ..synth import CalibrationSet, profile_set
from ..synth._set import MANIFEST, SetMismatch, own_manifest, read_manifest
from ..synth._sources import create_calibration_set
from . import _peer  # noqa: F401  (registers the "mct" source)
from ._tasks import BENCH_TASKS, resolve_task

__all__ = ["QualityBenchConfig", "bench_quality", "parse_spec", "quality_table"]

_logger = logging.getLogger(__name__)
_SYNTHESISED = ("gznq", "zeroq")  # sources that take the generator's settings (iterations, batch size...)


@dataclass
class QualityBenchConfig:
    """What `bzq bench quality` runs: every task x scheme x source x seed."""

    tasks: list[str] = field(default_factory=lambda: ["cifar_resnet20"])
    schemes: list[str] = field(default_factory=lambda: ["brevitas-w4a4", "brevitas-w8a8", "pt2e-w8a8"])
    sources: list[str] = field(default_factory=lambda: ["real", "gaussian", "zeroq", "gznq", "mct"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    images: int = 128
    synthesis: dict = field(default_factory=dict)  # settings for gznq/zeroq (e.g. iterations), unless a spec says
    eval_limit: int | None = None
    device: str = "auto"
    # Save each cell's quantized model beside its JSON (``seed0.model/``, no ONNX): `bzq eval` reads it, and a
    # data-free cell of another task of the same model evaluates it instead of quantizing again.
    keep_models: bool = False


_SPEC = re.compile(r"^(?P<name>[^\[\]]+)(\[(?P<args>[^\[\]]*)\])?$")


def parse_spec(spec: str) -> tuple[str, dict]:
    """``name[key=value,...]`` -> (name, settings); values are read as YAML scalars (``0.1``, ``true``, ``l2``)."""
    match = _SPEC.match(spec.strip())
    if not match:
        raise BzqError(f"cannot read '{spec}': expected NAME or NAME[key=value,...].")
    settings = {}
    for item in filter(None, (match["args"] or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise BzqError(f"'{spec}': '{item}' is not key=value.")
        settings[key.strip()] = yaml.safe_load(value)
    return match["name"], settings


def make_scheme(spec: str):
    """``brevitas-w4a4`` / ``pt2e-w8a8``, optionally ``[key=value,...]`` with config fields: the backend's config."""
    name, settings = parse_spec(spec)
    match = re.fullmatch(r"([a-z0-9_]+)-w(\d+)a(\d+)", name)
    if not match:
        raise BzqError(f"unknown scheme '{spec}': use brevitas-wXaY or pt2e-wXaY, optionally [key=value,...].")
    try:
        return create_quant_config(match[1], w_bits=int(match[2]), a_bits=int(match[3]), **settings)
    except BzqError as e:
        raise BzqError(f"scheme '{spec}': {e}") from None


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec).strip("_")


def _calibration_set(source: str, net, data_config, calib_folder: Path, folder: Path, seed: int, cfg, device):
    """Make (or reload) one calibration set in ``folder``; returns it and the seconds its making took."""
    name, settings = parse_spec(source)
    if name in _SYNTHESISED:  # resumable: the generator streams batches into the folder
        result = create_calibration_set(
            name, net, data_config, cfg.images, seed, out=folder, device=device, **{**cfg.synthesis, **settings}
        )
        return result, float(result.meta.get("synthesis_seconds") or 0.0)
    if (folder / MANIFEST).exists() and read_manifest(folder).get("complete"):
        loaded = CalibrationSet.load(folder, model=net, data_config=data_config)
        return loaded, float(loaded.meta.get("synthesis_seconds") or 0.0)
    start = time.perf_counter()
    target = calib_folder if name == "real" else name
    result = create_calibration_set(target, net, data_config, cfg.images, seed, device=device, **settings)
    result.meta.setdefault("synthesis_seconds", round(time.perf_counter() - start, 3))
    result.save(folder)
    return result, float(result.meta["synthesis_seconds"])


def bench_quality(config: QualityBenchConfig, out: str | Path) -> dict:
    """Run every cell not already in ``out``; write ``results.json`` and ``results.md``; return the results."""
    out = Path(out)
    schemes = {spec: make_scheme(spec) for spec in config.schemes}  # bad specs fail before any work
    settings = {spec: json.loads(json.dumps(_config_dict(c, {}))) for spec, c in schemes.items()}  # as cells read
    added = {spec: backend_for(c).added or {} for spec, c in schemes.items()}
    for source in config.sources:
        parse_spec(source)
    for cell in [*out.glob("cells/*/float.json"), *out.glob("cells/*/*/*/seed*.json")]:  # a damaged cell is
        _read_cell(cell)  # refused before any work
    device = resolve_device(config.device)
    for task_name in config.tasks:
        task, checkpoint, calib_folder, net, data_config, batches = _load_task(task_name, out, config, device)
        held_out = torch.cat([images for images, _ in batches])  # what each set's coverage is measured against
        # the other tasks of this model: a set not made of their real images, and a model made from it, are ours too
        twins = [
            t
            for t, b in BENCH_TASKS.items()
            if t != task_name and (b.model, b.checkpoint) == (task.model, task.checkpoint)
        ]
        for seed, source in itertools.product(config.seeds, config.sources):
            cells = {s: _cell_file(out, task_name, s, source, seed) for s in schemes}
            cells = {s: c for s, c in cells.items() if _result(c, settings[s], added[s]) is None}
            if not cells:
                continue
            shared = [] if parse_spec(source)[0] == "real" else twins
            _logger.info("%s: calibration set '%s' seed %d", task_name, source, seed)
            calib, seconds, twin = _shared_set(
                source, net, data_config, calib_folder, out, task_name, shared, seed, config, device
            )
            # how close to the training data the model finds the set; a diagnostic, never a setting's target
            profile = profile_set(net, calib.images, reference=held_out)
            for scheme, cell in cells.items():
                made = _kept_model(out, twin, scheme, source, seed, settings[scheme], added[scheme])
                if made is not None:
                    _logger.info("%s: %s on '%s' seed %d: %s's model", task_name, scheme, source, seed, made["task"])
                    qmodel = load_quantized(made["model"], device=device)[0]
                    quantized = {k: made.get(k) for k in _QUANTIZED} | {"model_kept": False, "model_from": made["task"]}
                else:
                    _logger.info("%s: %s calibrated on '%s' seed %d", task_name, scheme, source, seed)
                    keep = cell.with_suffix(".model") if config.keep_models else None
                    qmodel, quantized = _quantize_cell(net, calib, schemes[scheme], keep, task, checkpoint, data_config)
                row = {
                    "task": task_name,
                    "scheme": scheme,
                    "source": source,
                    "seed": seed,
                    **evaluate(qmodel, batches, reference=net, device=device),
                    "synthesis_seconds": seconds,
                    **quantized,
                    "bn_loss_trace": _loss_trace(calib),
                    "calibration_profile": profile,
                    "quant_config": settings[scheme],
                }
                cell.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(cell, lambda tmp, row=row: tmp.write_text(json.dumps(row, indent=2)))
                del qmodel  # before the next cell's quantization
    return collect(out, config)


_CELL_KEYS = ("task", "scheme", "source", "seed", "top1")
_QUANTIZED = ("quantization_seconds", "reconstruction_seconds", "reconstruction_units", "notes")


def _load_task(task_name: str, out: Path, config: QualityBenchConfig, device) -> tuple:
    """A task's definition, checkpoint, calibration folder, float model, data config and evaluation batches; its
    float cell written where it is missing."""
    task, checkpoint, calib_folder, eval_folder = resolve_task(task_name)
    net, data_config = load_model(task.model, checkpoint=checkpoint)
    net.to(device).eval()
    batches = list(create_loader(eval_folder, data_config, batch_size=50, limit=config.eval_limit))
    float_file = out / "cells" / _slug(task_name) / "float.json"
    if not float_file.exists():
        float_file.parent.mkdir(parents=True, exist_ok=True)
        result = {"task": task_name, "note": task.note, **evaluate(net, batches, device=device)}
        write_atomic(float_file, lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    return task, checkpoint, calib_folder, net, data_config, batches


def _quantize_cell(net, calib, scheme, keep: Path | None, task, checkpoint, data_config) -> tuple:
    """Quantize for one cell (the model kept in ``keep`` where given); the model and the cell's quantization fields."""
    start = time.perf_counter()
    qmodel, report = quantize(net, calib, scheme)
    seconds = round(time.perf_counter() - start, 2)
    recon = report.get("reconstruction", {})
    if keep is not None:
        save_quantized(
            qmodel,
            keep,
            model_name=task.model,
            config=scheme,
            data_config=data_config,
            calib=calib,
            report=report,
            checkpoint=checkpoint,
            export_onnx=False,
        )
    return qmodel, {
        "model_kept": keep is not None,  # a folder left by an earlier run of the cell is not this cell's model
        "quantization_seconds": seconds,
        "reconstruction_seconds": recon.get("seconds"),
        # each unit's error before and after, kept roundings and undecided fractions: what a cell's top-1 alone
        # cannot show (which blocks learned)
        "reconstruction_units": recon.get("units"),
        "notes": report.get("notes", []),
    }


def _shared_set(source, net, data_config, calib_folder, out, task_name, twins, seed, cfg, device):
    """The calibration set of ``source`` for this task, its making's seconds, and the twin task whose set it is: a
    twin's complete set of as many images where there is one (the same set, checked as the generator checks its own
    folder), else the set of the task's own folder (twin None)."""
    for twin in twins:
        folder = _set_folder(out, twin, source, seed)
        if (own_manifest(folder) or {}).get("complete"):
            try:
                calib, seconds = _calibration_set(source, net, data_config, calib_folder, folder, seed, cfg, device)
            except SetMismatch:  # made with other settings: this task makes its own
                continue
            if len(calib) == cfg.images:
                return calib, seconds, twin
    folder = _set_folder(out, task_name, source, seed)
    return *_calibration_set(source, net, data_config, calib_folder, folder, seed, cfg, device), None


def _kept_model(out: Path, twin: str | None, scheme: str, source: str, seed: int, settings: dict, added: dict):
    """The twin task's cell for the same scheme, source and seed, made under these settings, whose quantized model
    was kept: its record with ``model`` (the folder) added; None where there is none."""
    if twin is None:
        return None
    cell = _cell_file(out, twin, scheme, source, seed)
    record = _result(cell, settings, added)
    return {**record, "model": cell.with_suffix(".model")} if record and record.get("model_kept") else None


def _cell_file(out: Path, task: str, scheme: str, source: str, seed: int) -> Path:
    return out / "cells" / _slug(task) / _slug(scheme) / _slug(source) / f"seed{seed}.json"


def _set_folder(out: Path, task: str, source: str, seed: int) -> Path:
    return out / "sets" / _slug(task) / _slug(source) / f"seed{seed}"


def _result(cell: Path, settings: dict, added: dict) -> dict | None:
    """``cell``'s record where it holds a result for these settings, else None: a cell made under other defaults (its
    spec now resolves differently) is redone; one written before cells recorded their settings is kept, and so is one
    that lacks only fields added since with the value it was made with (``added``: the backend's table)."""
    record = _read_cell(cell)
    return record if record is not None and {**added, **record.get("quant_config", settings)} == settings else None


def _read_cell(path: Path) -> dict | None:
    """A result cell (None if there is none); one that does not parse, or lacks a cell's keys, is refused in one
    line naming it (it may be hand-edited: bzq neither overwrites nor ignores it)."""
    return read_own_record(path, ("task", "top1") if path.name == "float.json" else _CELL_KEYS)


def _loss_trace(calib: CalibrationSet) -> list[float] | None:
    traces = [b["bn_loss_trace"] for b in calib.meta.get("batches", []) if "bn_loss_trace" in b]
    return [statistics.fmean(step) for step in zip(*traces, strict=False)] if traces else None


def collect(out: Path, config: QualityBenchConfig | None = None) -> dict:
    """Gather every cell under ``out`` into ``results.json`` and the Markdown table ``results.md``."""
    out = Path(out)
    cells = [_read_cell(p) for p in sorted((out / "cells").glob("*/*/*/seed*.json"))]
    floats = {c["task"]: c for c in map(_read_cell, (out / "cells").glob("*/float.json"))}
    results = {
        "date": date.today().isoformat(),
        "machine": machine(),
        "versions": {**library_versions(), **_more_versions()},
        "config": asdict(config) if config else None,
        "float": floats,
        "cells": cells,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(quality_table(results))
    return results


def _more_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for dist in ("brevitas", "torchao", "model-compression-toolkit"):
        with contextlib.suppress(PackageNotFoundError):
            found[dist] = version(dist)
    return found


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def _mean_or_none(values: list[float | None]) -> float | None:
    """The mean of the recorded values (cells without reconstruction, or older than the field, record none)."""
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def summarise(results: dict) -> list[dict]:
    """One row per (task, scheme, source): mean/std over seeds, and the share of the real-vs-noise gap closed."""
    groups: dict[tuple, list[dict]] = {}
    for cell in results["cells"]:
        groups.setdefault((cell["task"], cell["scheme"], cell["source"]), []).append(cell)
    rows = []
    for (task, scheme, source), cells in groups.items():
        top1 = [c["top1"] for c in cells]
        rows.append(
            {
                "task": task,
                "scheme": scheme,
                "source": source,
                "seeds": len(cells),
                "top1": statistics.fmean(top1),
                "top1_text": _mean_std(top1),
                "agreement": statistics.fmean(c["agreement"] for c in cells),
                "synthesis_seconds": statistics.fmean(c["synthesis_seconds"] for c in cells),
                "reconstruction_seconds": _mean_or_none([c.get("reconstruction_seconds") for c in cells]),
                **{
                    key: _mean_or_none([(c.get("calibration_profile") or {}).get(key) for c in cells])
                    for key in ("bn_loss", "confidence", "coverage")
                },
            }
        )
    means = {(r["task"], r["scheme"], r["source"]): r["top1"] for r in rows}
    for r in rows:
        real, noise = means.get((r["task"], r["scheme"], "real")), means.get((r["task"], r["scheme"], "gaussian"))
        telling = real is not None and noise is not None and real - noise >= 3.0  # else the data does not matter
        r["gap_closed"] = (r["top1"] - noise) / (real - noise) if telling else None
        r["vs_real"] = r["top1"] - real if real is not None else None
    return rows


def quality_table(results: dict) -> str:
    """The Markdown tables: one per task, rows grouped by scheme."""
    m = results["machine"]
    lines = [
        f"Measured {results['date']} on {m['cpu']} ({m['threads']} torch threads"
        + (f", {m['gpu']}" if "gpu" in m else "")
        + "); "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
        "",
    ]
    rows = summarise(results)
    for task in sorted({r["task"] for r in rows}):
        fl = results["float"].get(task, {})
        lines += [
            f"### {task} (float top-1 {fl.get('top1', float('nan')):.2f} on {fl.get('n', '?')} images; "
            f"{fl.get('note', '')})",
            "",
            "| scheme | source | seeds | top-1 % | vs real | gap closed | agreement % | set BN loss | confidence "
            "| coverage | synthesis s | reconstruction s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted((r for r in rows if r["task"] == task), key=lambda r: (r["scheme"], r["source"])):
            vs = f"{r['vs_real']:+.2f}" if r["vs_real"] is not None else "–"
            gap = f"{100 * r['gap_closed']:.0f} %" if r["gap_closed"] is not None and r["source"] != "real" else "–"
            recon = f"{r['reconstruction_seconds']:.1f}" if r["reconstruction_seconds"] is not None else "–"
            bn = f"{r['bn_loss']:.4f}" if r["bn_loss"] is not None else "–"
            confidence = f"{r['confidence']:.2f}" if r["confidence"] is not None else "–"
            coverage = f"{r['coverage']:.2f}" if r["coverage"] is not None else "–"
            lines.append(
                f"| {r['scheme']} | {r['source']} | {r['seeds']} | {r['top1_text']} | {vs} | {gap} | "
                f"{r['agreement']:.2f} | {bn} | {confidence} | {coverage} | {r['synthesis_seconds']:.1f} | {recon} |"
            )
        lines.append("")
    return "\n".join(lines)
