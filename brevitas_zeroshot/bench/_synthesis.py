"""`bzq bench synthesis`: the cost of one synthesis step against a bare forward+backward of the same batch."""

import resource
import statistics
import time

import torch
from torch import nn

from .._utils import resolve_device
from ..synth import Synthesiser
from ..synth._bn_cpu import kernels

__all__ = ["benchmark_synthesis"]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark_synthesis(
    model: nn.Module,
    data_config: dict | None = None,
    batch_size: int = 128,
    steps: int = 20,
    repeats: int = 3,
    device: str | torch.device | None = None,
    peer: bool = False,
    **settings,
) -> dict:
    """Seconds per synthesis step (at full and at half size) and per bare forward+backward (input gradient, frozen
    weights), their ratio, and what a whole set costs under the ``low_res`` schedule against plain passes.

    Both are timed in the same process, interleaved ``repeats`` times; the medians are reported. The synthesis step
    is the real loop (``steps`` iterations minus a 0-iteration run, so setup and the final pass cancel out).
    """
    device = resolve_device(device)
    calib = Synthesiser(model, data_config, device, num_images=batch_size, batch_size=batch_size, **settings)
    c, h, w = calib.data_config["input_size"]
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    iterations = calib.config.iterations
    x = torch.randn(batch_size, c, h, w, device=device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()

    def bare(n: int) -> float:
        with calib._synthesis_mode():
            _sync(device)
            t = time.perf_counter()
            for _ in range(n):
                with amp:
                    out = model(x)
                out.float().sum().backward()
            _sync(device)
            return time.perf_counter() - t

    low_res = calib.config.low_res

    def synth(n: int, low: bool = False) -> float:
        calib.config.iterations = n
        calib.config.low_res = 1 - 1 / (2 * n + 2) if low else 0.0  # every step at half or at full size
        _sync(device)
        t = time.perf_counter()
        calib.generate(show_progress=False)
        _sync(device)
        return time.perf_counter() - t

    def mct(n: int) -> float:
        from ._peer import mct as mct_source

        _sync(device)
        t = time.perf_counter()
        mct_source(model, calib.data_config, batch_size, 0, None, device, n_iter=n, data_gen_batch_size=batch_size)
        _sync(device)
        return time.perf_counter() - t

    bare(2), synth(2)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bare_times, synth_times, low_times, mct_times = [], [], [], []
    for _ in range(repeats):
        bare_times.append(bare(steps) / steps)
        synth_times.append((synth(steps) - synth(0)) / steps)
        if low_res:
            low_times.append((synth(steps, low=True) - synth(0)) / steps)
        if peer:  # MCT's setup (copy, trace) cancels out in the difference
            mct_times.append((mct(2 * steps) - mct(steps)) / steps)
    step, fwd_bwd = statistics.median(synth_times), statistics.median(bare_times)
    low_step = statistics.median(low_times) if low_res else step
    mean_step = low_res * low_step + (1 - low_res) * step  # the schedule's average step
    calib.config.iterations, calib.config.low_res = iterations, low_res
    extra = {}
    if peer:
        mct_step = statistics.median(mct_times)
        extra = {
            "mct_step_s": mct_step,
            "mct_iterations": 500,
            # wall time for the same images, each with its default number of iterations
            "time_vs_mct": (mean_step * iterations) / (mct_step * 500),
        }
    return {
        "model": calib.manifest()["model"],
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "input_size": list(calib.data_config["input_size"]),
        "synthesis_step_s": step,
        "forward_backward_s": fwd_bwd,
        "ratio": step / fwd_bwd,
        "low_res": low_res,
        "low_res_step_s": low_step,
        "precision": calib.precision,
        "bn_kernels": "compiled" if device.type == "cpu" and kernels() is not None else "torch",
        "iterations": iterations,
        # a whole set under the schedule, against the same number of plain full-size forward+backward passes
        "set_cost_vs_fwd_bwd": mean_step / fwd_bwd,
        # ... and against 200 plain passes, a fixed yardstick whatever the number of iterations
        "set_cost_vs_200_fwd_bwd": mean_step * iterations / (200 * fwd_bwd),
        "images_per_s": batch_size / (mean_step * iterations),
        "peak_memory_mib": (torch.cuda.max_memory_allocated(device) / 2**20)
        if device.type == "cuda"
        else _peak_rss_mib(),
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss",
        **extra,
    }
