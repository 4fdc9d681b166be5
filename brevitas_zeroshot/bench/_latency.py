"""`bzq bench latency`: a quantized output folder against its float model, in the runtime it deploys to, and sizes.

PT2E: the float and quantized programs compiled by Inductor (and eagerly, for reference); the files are ``.pt2``
programs. Brevitas: the float and quantized models exported to ONNX and run in onnxruntime with its default
optimisations; the files are ``.onnx``. Every timing in one process, interleaved, medians: ratios, not seconds, carry
over between machines.
"""

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .._utils import library_versions, machine
from ..models import load_model
from ..quant import load_quantized, lower_quantized

__all__ = ["bench_latency"]


def _interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each callable, timed in turn ``repeats`` times after two warm-up calls each."""
    for run in runs.values():
        run(), run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _row(runtime: str, float_s: float, quant_s: float, batch: int) -> dict:
    return {
        "runtime": runtime,
        "float_ms": round(1000 * float_s, 2),
        "quantized_ms": round(1000 * quant_s, 2),
        "speedup": round(float_s / quant_s, 3),
        "quantized_images_per_s": round(batch / quant_s, 1),
    }


@torch.no_grad()
def bench_latency(folder: str | Path, batch_size: int = 32, repeats: int = 10, threads: int | None = None) -> dict:
    """Latency of the quantized model in ``folder`` (written by ``bzq quantize``) against its float architecture
    on one batch of ``batch_size``, and the sizes of the deployable files; see the module docstring.

    The float model is built without its weights: neither its speed nor its file size depends on their values.
    """
    if threads:
        torch.set_num_threads(threads)
    folder = Path(folder)
    qmodel, data_config = load_quantized(folder, device="cpu")
    meta = qmodel.bzq_meta
    backend = meta["quantization"]["backend"]
    float_model, _ = load_model(meta["model"], pretrained=False)
    float_model.eval()
    x = torch.randn(batch_size, *data_config["input_size"], generator=torch.Generator().manual_seed(0))
    rows, notes, sizes = [], [], {}
    eager = _interleaved({"float": lambda: float_model(x), "quantized": lambda: qmodel(x)}, repeats)
    rows.append(_row("pytorch eager", eager["float"], eager["quantized"], batch_size))
    with tempfile.TemporaryDirectory(prefix="bzq-latency-") as tmp:
        if backend == "pt2e":
            from ..quant._pt2e import compile_program, export_program, int8_layers

            float_file = Path(tmp) / "float.pt2"  # before compiling, which changes what an export would capture
            torch.export.save(export_program(float_model, x[:2].clone()), str(float_file))
            sizes = _sizes(float_file, folder / meta["files"]["program"])
            fast_float, float_runtime = compile_program(float_model, x)
            lowered = int8_layers()
            fast_quant, quant_runtime = lower_quantized(qmodel, backend, x)
            if float_runtime == quant_runtime == "inductor":
                compiled = _interleaved({"float": lambda: fast_float(x), "quantized": lambda: fast_quant(x)}, repeats)
                row = _row("inductor (torch.compile)", compiled["float"], compiled["quantized"], batch_size)
                # conv/linear layers that became int8 kernels (the others run in float between (de)quantizers)
                rows.append(row | {"int8_layers": int8_layers() - lowered})
            else:
                notes.append(f"not compiled: float {float_runtime}; quantized {quant_runtime}")
        elif meta["files"].get("onnx"):
            from ..quant._onnx import INPUT, OUTPUT, integer_layers, onnx_session

            float_file = Path(tmp) / "float.onnx"
            torch.onnx.export(
                float_model,
                (x[:1],),
                str(float_file),
                opset_version=17,
                dynamo=False,
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            )
            n = threads or torch.get_num_threads()
            optimised = Path(tmp) / "optimised.onnx"
            sessions = {
                "float": onnx_session(float_file, n),
                "quantized": onnx_session(folder / "model.onnx", n, optimised=optimised),
            }
            feed = {INPUT: x.numpy()}
            runs = {name: (lambda s=s: s.run(None, feed)) for name, s in sessions.items()}
            ort = _interleaved(runs, repeats)
            row = _row("onnxruntime (default optimisations)", ort["float"], ort["quantized"], batch_size)
            rows.append(row | integer_layers(optimised))
            sizes = _sizes(float_file, folder / "model.onnx")
        else:
            notes.append("no model.onnx in the folder (quantized with --no-onnx): only eager PyTorch is timed")
    if backend == "brevitas":
        notes.append(
            "model.safetensors holds the Brevitas state (float32 weights and the quantizers' scales, for reloading "
            "into Brevitas); the integer weights on disk are model.onnx's"
        )
    return {
        "folder": folder.name,
        "model": meta["model"],
        "backend": backend,
        "scheme": f"w{meta['quantization']['w_bits']}a{meta['quantization']['a_bits']}",
        "batch_size": batch_size,
        "input_size": list(data_config["input_size"]),
        "repeats": repeats,
        "rows": rows,
        "sizes": sizes,
        "notes": notes,
        "machine": machine(),
        "versions": library_versions(),
    }


def _sizes(float_file: Path, quantized_file: Path) -> dict:
    f, q = float_file.stat().st_size, quantized_file.stat().st_size
    return {"file": quantized_file.name, "float_bytes": f, "quantized_bytes": q, "ratio": round(q / f, 3)}
