import contextlib
import functools
import hashlib
import logging
import os
import platform
import sys
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

_logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on: the one asked for, else CUDA when present, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def progress(iterable=None, **kwargs) -> tqdm:
    """A progress bar on stderr, so stdout stays clean for ``--json``; none when stderr is not a terminal (a
    redirected log would fill with carriage-return frames)."""
    kwargs["disable"] = kwargs.get("disable", False) or not sys.stderr.isatty()
    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, leave=False, **kwargs)


def library_versions() -> dict:
    """Versions recorded beside every artefact (synthetic sets, quantized models)."""
    import timm

    from .version import __version__

    return {
        "brevitas_zeroshot": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this machine's CPU (``/proc/cpuinfo``; empty where it cannot be read)."""
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        return frozenset(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    return frozenset()


def cpu_extension(name: str, source: str, what: str):
    """C++ ``source`` built with torch's extension loader for this CPU (``-march=native``), or None where it cannot
    be (``BZQ_NO_CPU_KERNELS=1``, no compiler or ninja, a failed build), so the caller falls back to torch ops.

    The build's name includes the source and this CPU's flags, so a cache shared by machines never runs code built
    for another CPU. The first build takes about a minute; later processes load it. Callers cache the result."""
    if os.environ.get("BZQ_NO_CPU_KERNELS") == "1":
        return None
    digest = hashlib.sha1((source + " ".join(sorted(cpu_flags())) + torch.__version__).encode()).hexdigest()[:12]
    try:
        from torch.utils.cpp_extension import load_inline

        _logger.info("loading the %s (built once per machine: about a minute)", what)
        return load_inline(
            f"{name}_{digest}",
            cpp_sources=source,
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, a failed build: torch ops do the same work, slower
        why = (str(e).splitlines() or [type(e).__name__])[0]
        _logger.warning("%s unavailable (%s); using torch ops", what, why)
        return None


def has_int8_dot_product() -> bool:
    """Whether this x86 CPU has VNNI (AVX512-VNNI or AVX-VNNI): int8 kernels without it add pairs of u8 x s8
    products in 16 bits and saturate on 8-bit activations."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def has_native_bf16() -> bool:
    """Whether this x86 CPU computes in bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated, slower."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


@functools.cache
def _glibc():
    """glibc (``ctypes``), or None where the C library is another one."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@functools.cache
def keep_freed_memory() -> bool:
    """Keep memory the process frees for its next allocations (glibc only; once per process; True if set).

    By default glibc serves every block above 32 MB with a fresh ``mmap`` and returns it to the system when freed, so
    each new 224 px activation tensor (tens of MB) is page-faulted and zeroed again: on the development CPU that is
    ~85 % of a memory-bound op (a 77 MB multiply: 79 ms, 8.5 ms without) and a third of a whole synthesis step. The
    cost: a phase's peak stays resident until the phase gives it back (``releases_memory``).
    """
    libc = _glibc()
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc and libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1))


def releases_memory(fn: Callable) -> Callable:
    """Decorator for a phase (synthesis, quantization, evaluation): when it returns or raises, the process's free
    heap goes back to the system (glibc ``malloc_trim``), so the next phase, or the caller's own code, does not start
    beside this one's kept peak. With freed memory kept (``keep_freed_memory``) glibc's own trim never fires when the
    free space is fragmented rather than at the heap's top: one EfficientNet-Lite2 PT2E cell ended with 13.7 GiB free
    in the heap, and a bench process running cell after cell was killed for memory at 23 GiB."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            if libc := _glibc():
                libc.malloc_trim(0)

    return wrapper


def free_memory(device: torch.device) -> int | None:
    """Bytes the process could still allocate on ``device``: what the system has free (CUDA: free device memory; CPU
    on Linux: MemAvailable) plus what the process's own allocator holds unused (CUDA's cache; glibc's free heap, which
    ``keep_freed_memory`` stops returning). None where unknown."""
    if device.type == "cuda":
        return (
            torch.cuda.mem_get_info(device)[0]
            + torch.cuda.memory_reserved(device)
            - torch.cuda.memory_allocated(device)
        )
    with contextlib.suppress(OSError, StopIteration, ValueError), open("/proc/meminfo") as f:
        return int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) * 1024 + _free_heap()
    return None


def _free_heap() -> int:
    """Free bytes in glibc's main heap (``mallinfo2``, glibc 2.33+); 0 elsewhere."""
    import ctypes

    class MallInfo2(ctypes.Structure):  # struct mallinfo2: ten size_t, the 9th is fordblks (free bytes)
        _fields_ = [(f"f{i}", ctypes.c_size_t) for i in range(10)]

    mallinfo2 = getattr(_glibc(), "mallinfo2", None)
    if mallinfo2 is None:
        return 0
    mallinfo2.restype = MallInfo2
    return int(mallinfo2().f8)


def machine() -> dict:
    """The CPU (model name and the flags that decide our kernels), threads, platform and GPU: recorded beside every
    benchmark figure."""
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    info = {
        "cpu": cpu,
        "cpu_flags": [f for f in wanted if f in cpu_flags()],
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
