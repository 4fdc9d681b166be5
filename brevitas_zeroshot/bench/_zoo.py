"""`bzq bench zoo`: which timm architectures go through each step of the flow (a compatibility matrix, not a test).

Each model runs in its own process with a time limit (a graph pass that never finishes is a result too), with
random weights (no download) and a small input: BN-statistics synthesis, Brevitas W8A8 (with its ONNX export and
the export's parity) and W4A4, PT2E W8A8, and a forward pass of each quantized model. Every step's outcome is
written to ``OUT/models/NAME.json`` as soon as it is known, so an interrupted matrix resumes where it stopped.
"""

import json
import multiprocessing
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

from .._errors import first_line
from .._files import write_atomic
from .._utils import library_versions, machine

__all__ = ["ZOO", "ZooBenchConfig", "STEPS", "bench_zoo", "zoo_markdown"]

# (timm name, input side): at least one of each family users pick; BN-free ones last. Models whose patch or window
# layout fixes the input size keep it.
ZOO: list[tuple[str, int]] = [
    ("resnet18", 64),
    ("resnet50", 64),
    ("resnext50_32x4d", 64),
    ("wide_resnet50_2", 64),
    ("resnet10t", 64),
    ("regnetx_002", 64),
    ("regnety_002", 64),
    ("mobilenetv2_100", 64),
    ("mobilenetv3_large_100", 64),
    ("efficientnet_b0", 64),
    ("tf_efficientnet_lite0", 64),
    ("efficientnetv2_rw_t", 64),
    ("mnasnet_100", 64),
    ("fbnetc_100", 64),
    ("ghostnet_100", 64),
    ("rexnet_100", 64),
    ("mixnet_s", 64),
    ("lcnet_050", 64),
    ("densenet121", 64),
    ("inception_v3", 96),
    ("repvgg_a0", 64),
    ("dla34", 64),
    ("hrnet_w18_small", 64),
    ("cspresnet50", 64),
    ("cspdarknet53", 64),
    ("vgg11_bn", 64),
    ("selecsls42b", 64),
    ("mobilevit_xxs", 64),
    ("levit_128s", 224),
    ("efficientformer_l1", 224),
    ("fastvit_t8", 64),
    ("vit_tiny_patch16_224", 224),
    ("deit_tiny_patch16_224", 224),
    ("convnext_atto", 64),
    ("swin_tiny_patch4_window7_224", 224),
]

STEPS = ("build", "synthesis", "brevitas_w8a8", "onnx", "brevitas_w4a4", "pt2e_w8a8")


@dataclass
class ZooBenchConfig:
    """What `bzq bench zoo` runs: the models (timm names, optionally ``name@side``), and its small budget."""

    models: list[str] = field(default_factory=lambda: [f"{name}@{side}" for name, side in ZOO])
    images: int = 4
    iterations: int = 2
    reconstruct_iters: int = 1
    timeout_s: int = 300


def _one_line(e: BaseException) -> str:
    text = first_line(e, 240)
    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    site = f" [{Path(where.filename).name}:{where.lineno}]" if where else ""
    return f"{type(e).__name__}: {text}{site}"


def _check_model(spec: str, config: dict, path: str) -> None:
    """Run every step on one model (in a child process), writing the record after each step."""
    import torch

    from .._errors import BzqError
    from ..models import load_model
    from ..quant import BrevitasConfig, PT2EConfig, quantize, save_quantized
    from ..synth import Synthesiser, create_calibration_set

    torch.set_num_threads(1)
    name, _, side = spec.partition("@")
    record = {"model": name, "steps": {}}

    def save() -> None:
        write_atomic(Path(path), lambda tmp: tmp.write_text(json.dumps(record, indent=2)))

    def step(key: str, run) -> object:
        start = time.perf_counter()
        record["steps"][key] = {"status": "running"}
        save()
        try:
            value, extra = run()
            record["steps"][key] = {"status": "pass", **extra}
        except Exception as e:
            value, record["steps"][key] = None, {"status": "fail", "reason": _one_line(e)}
        record["steps"][key]["seconds"] = round(time.perf_counter() - start, 2)
        save()
        return value

    def build():
        model, data_config = load_model(name, pretrained=False)
        size = int(side) if side else data_config["input_size"][-1]
        data_config = {**data_config, "input_size": (3, size, size)}
        n = sum(p.numel() for p in model.parameters())
        return (model, data_config), {"params_m": round(n / 1e6, 2), "input": size}

    built = step("build", build)
    if built is None:
        return
    model, data_config = built

    def synthesis():
        try:
            synth = Synthesiser(
                model, data_config, "cpu", num_images=config["images"], batch_size=config["images"],
                iterations=config["iterations"],
            )  # fmt: skip
        except BzqError as e:
            if "no BatchNorm" not in str(e):
                raise
            calib = create_calibration_set("gaussian", model, data_config, num_images=config["images"])
            return calib, {"note": "no BatchNorm: refused with a clear error; the rest uses Gaussian noise"}
        return synth.generate(show_progress=False), {"bn_layers": len(synth.bn_layers)}

    calib = step("synthesis", synthesis)
    if calib is None:
        calib = create_calibration_set("gaussian", model, data_config, num_images=config["images"])
    x = calib.images[:2]

    def forward(qmodel) -> dict:
        with torch.no_grad():
            out = qmodel(x)
        if not torch.isfinite(out).all():
            raise RuntimeError("the quantized model's output is not finite")
        return {}

    def brevitas(bits: int):
        def run():
            # a compatibility check, not a quality one: no GPTQ, one reconstruction step (the block cut is what
            # can fail), so that 35 models fit in an hour on 2 cores
            cfg = BrevitasConfig(w_bits=bits, a_bits=bits, gptq=False, reconstruct_iters=config["reconstruct_iters"])
            qmodel, report = quantize(model, calib, cfg)
            forward(qmodel)
            return (qmodel, cfg, report), {"graph": report.get("graph"), "float_layers": report.get("float_layers")}

        return run

    w8 = step("brevitas_w8a8", brevitas(8))

    def onnx():
        qmodel, cfg, report = w8
        with tempfile.TemporaryDirectory(prefix="bzq-zoo-") as tmp:
            save_quantized(
                qmodel, tmp, model_name=name, config=cfg, data_config=data_config, calib=calib, report=report,
                write_calibration=False,
            )  # fmt: skip
        if "onnx_parity" not in report:
            raise RuntimeError("; ".join(report.get("failed_steps", [])) or "no ONNX file was written")
        parity = report["onnx_parity"]
        if not parity["passed"]:
            raise RuntimeError(
                f"parity failed: agreement {parity.get('agreement')} %, median |diff| {parity.get('median_abs_diff')} "
                f"(rounding sensitivity {parity.get('rounding_sensitivity')}, largest logit "
                f"{parity.get('max_abs_logit')})"
            )
        return None, {"max_abs_diff": parity["max_abs_diff"]}

    if w8 is not None:
        step("onnx", onnx)
    step("brevitas_w4a4", brevitas(4))

    def pt2e():
        qmodel, report = quantize(model, calib, PT2EConfig())
        forward(qmodel)
        return None, {}

    step("pt2e_w8a8", pt2e)
    record["done"] = True
    save()


def bench_zoo(config: ZooBenchConfig, out: str | Path) -> dict:
    """Run the matrix into ``out`` (resumable: a model with a finished record is not run again); returns it."""
    out = Path(out)
    (out / "models").mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    for spec in config.models:
        name = spec.partition("@")[0]
        path = out / "models" / f"{name}.json"
        if path.exists() and json.loads(path.read_text()).get("done"):
            continue
        path.unlink(missing_ok=True)
        start = time.perf_counter()
        child = context.Process(target=_check_model, args=(spec, asdict(config), str(path)))
        child.start()
        child.join(config.timeout_s)
        record = json.loads(path.read_text()) if path.exists() else {"model": name, "steps": {}}
        if child.is_alive() or child.exitcode != 0:
            timed_out = child.is_alive()
            child.kill()
            child.join()
            running = [s for s in record["steps"].values() if s["status"] == "running"]
            if not running:  # it stopped before its first step (while importing)
                running = [record["steps"].setdefault("build", {"status": "running"})]
            reason = (
                f"did not finish within the {config.timeout_s} s budget"
                if timed_out
                else f"the process died (exit code {child.exitcode})"
            )
            running[0].update(status="timeout" if timed_out else "fail", reason=reason)
        record["done"], record["seconds"] = True, round(time.perf_counter() - start, 1)
        write_atomic(path, lambda tmp, r=record: tmp.write_text(json.dumps(r, indent=2)))
        print(f"{name}: {_summary(record)} ({record['seconds']} s)", file=sys.stderr, flush=True)
    records = [json.loads((out / "models" / f"{s.partition('@')[0]}.json").read_text()) for s in config.models]
    result = {
        "date": date.today().isoformat(),
        "config": asdict(config),
        "machine": machine(),
        "versions": library_versions(),
        "models": records,
    }
    write_atomic(out / "zoo.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    write_atomic(out / "zoo.md", lambda tmp: tmp.write_text(zoo_markdown(result)))
    return result


def _summary(record: dict) -> str:
    return " ".join(f"{k}={v['status']}" for k, v in record["steps"].items())


_MARK = {"pass": "✓", "fail": "✗", "timeout": "⏱", "running": "?"}


def _cell(step: dict | None) -> str:
    if step is None:
        return "–"
    mark = _MARK.get(step["status"], step["status"])
    if "note" in step:
        return "no BN: refused"
    if step["status"] == "pass":
        return f"{mark} {step.get('graph') or ''}".strip() + f" ({step['seconds']:.0f} s)"
    return f"{mark} ({step.get('seconds', 0):.0f} s)"


def zoo_markdown(result: dict) -> str:
    """The matrix as Markdown: one row per model, one column per step, then every failure's one-line reason."""
    models = result["models"]
    lines = [
        "| model | params (M) | input | " + " | ".join(STEPS[1:]) + " |",
        "|---|---|---|" + "---|" * (len(STEPS) - 1),
    ]
    failures = []
    for record in models:
        steps = record["steps"]
        build = steps.get("build", {})
        cells = [_cell(steps.get(key)) for key in STEPS[1:]]
        lines.append(
            f"| {record['model']} | {build.get('params_m', '–')} | {build.get('input', '–')} | "
            + " | ".join(cells)
            + " |"
        )
        for key in STEPS:
            if key in steps and steps[key]["status"] != "pass":
                failures.append(f"- **{record['model']}**, {key}: {steps[key].get('reason', steps[key]['status'])}")
    bn = [r for r in models if "note" not in r["steps"].get("synthesis", {})]
    flow = ("synthesis", "brevitas_w8a8", "brevitas_w4a4", "pt2e_w8a8")
    passed = [r for r in bn if all(r["steps"].get(k, {}).get("status") == "pass" for k in flow)]
    summary = (
        f"{len(passed)} of {len(bn)} BatchNorm architectures pass synthesis, Brevitas W8A8 and W4A4, PT2E W8A8 and "
        f"a forward pass of each ({100 * len(passed) / max(len(bn), 1):.0f} %); "
        f"{sum(r['steps'].get('onnx', {}).get('status') == 'pass' for r in models)} of {len(models)} export to ONNX "
        "with parity."
    )
    m = result["machine"]
    head = (
        f"Run {result['date']} on {m['cpu']} ({', '.join(m.get('cpu_flags', []))}), one thread per model; "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items())
        + ".\n\n"
        + summary
        + "\n\n✓ passed (with the graph mode Brevitas used), ✗ failed, ⏱ did not finish within the budget, – not run "
        "(a step it needs failed); 'no BN: refused': a model without BatchNorm, for which synthesis stops with a "
        "clear error and the other steps calibrate on Gaussian noise. Seconds are per step, one thread.\n\n"
    )
    return head + "\n".join(lines) + "\n\n### Failures\n\n" + ("\n".join(failures) or "None.") + "\n"
