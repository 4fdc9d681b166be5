"""Benchmark tasks: a model with its weights, a real calibration folder and a disjoint real evaluation folder.

Everything is read from the shared benchmark folder (``$BZQ_SHARED_BENCHMARKS``, default ``../shared/benchmarks``
beside the project). Splits of one archive are written once as folders of symbolic links in the cache.
"""

import csv
import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .._errors import BzqError
from ..data import ImageFolderDataset
from ..data._folder import cache_dir
from ..models import PACKAGED_WEIGHTS

__all__ = ["BenchTask", "BENCH_TASKS", "register_task", "shared_benchmarks"]


@dataclass(frozen=True)
class BenchTask:
    """Where one benchmark row's model and images come from, relative to the shared benchmark folder."""

    model: str
    checkpoint: str | None  # None: the model's packaged or pretrained weights
    calib: str  # archive of real calibration images
    eval: str  # archive of held-out evaluation images
    split: str = "none"  # how one archive is cut into calib/eval: a key of _SPLITS
    note: str = ""


BENCH_TASKS: dict[str, BenchTask] = {}


def register_task(name: str, task: BenchTask) -> BenchTask:
    BENCH_TASKS[name] = task
    return task


_CIFAR_CALIB, _CIFAR_TEST = "cifar10/cifar10-train-calib.tar", "cifar10/cifar10-test-dev.tar"
_IMAGENET = "imagenet/imagenet-sample-even.tar"
for _depth in (20, 32):
    _ckpt = {20: "cifar10/resnet20-12fca82f.th", 32: "cifar10/resnet32-d509ac18.th"}[_depth]
    register_task(
        f"cifar_resnet{_depth}",
        BenchTask(f"cifar_resnet{_depth}", _ckpt, _CIFAR_CALIB, _CIFAR_TEST, note="real: train-calib; eval: test-dev"),
    )
    register_task(
        f"cifar_resnet{_depth}:tune",
        BenchTask(
            f"cifar_resnet{_depth}",
            _ckpt,
            _CIFAR_CALIB,
            _CIFAR_CALIB,
            split="half-per-class",
            note="tuning split: real from the first 50 train-calib images per class, eval on the last 50",
        ),
    )
for _model in PACKAGED_WEIGHTS:  # the ImageNet models whose weights install offline
    register_task(
        _model,
        BenchTask(
            _model,
            None,
            _IMAGENET,
            _IMAGENET,
            split="class-mod-4",
            note="real: the 250 sample images of classes 0, 4, 8...; eval: the 250 of classes 2, 6, 10...",
        ),
    )
    register_task(
        f"{_model}:tune",
        BenchTask(
            _model,
            None,
            _IMAGENET,
            _IMAGENET,
            split="class-mod-4-swapped",
            note="tuning split: real from the 250 sample images of classes 2, 6, 10...; eval on classes 0, 4, 8...",
        ),
    )


def shared_benchmarks() -> Path:
    default = Path(__file__).resolve().parents[2] / ".." / "shared" / "benchmarks"
    return Path(os.environ.get("BZQ_SHARED_BENCHMARKS", default)).resolve()


def resolve_task(name: str, shared: Path | None = None) -> tuple[BenchTask, Path | None, Path, Path]:
    """The task, its checkpoint path, and its real calibration and evaluation folders (split when needed)."""
    if name not in BENCH_TASKS:
        raise BzqError(f"unknown benchmark task '{name}': use one of {', '.join(sorted(BENCH_TASKS))}.")
    task, shared = BENCH_TASKS[name], shared or shared_benchmarks()
    paths = [shared / p for p in (task.calib, task.eval) + ((task.checkpoint,) if task.checkpoint else ())]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise BzqError(f"task '{name}' needs {missing[0]} (set BZQ_SHARED_BENCHMARKS to the benchmark folder).")
    checkpoint = shared / task.checkpoint if task.checkpoint else None
    if task.split == "none":
        return task, checkpoint, shared / task.calib, shared / task.eval
    keep = _SPLITS[task.split]
    calib = _split_folder(shared / task.calib, task.split, "calib", lambda i, label: keep(i, label) == "calib")
    held = _split_folder(shared / task.eval, task.split, "eval", lambda i, label: keep(i, label) == "eval")
    return task, checkpoint, calib, held


# Index within its class -> part; class index -> part.
_SPLITS: dict[str, Callable[[int, int], str | None]] = {
    "half-per-class": lambda i, label: "calib" if i < 50 else "eval",
    "class-mod-4": lambda i, label: {0: "calib", 2: "eval"}.get(label % 4),
    "class-mod-4-swapped": lambda i, label: {2: "calib", 0: "eval"}.get(label % 4),
}


def _split_folder(archive: Path, split: str, part: str, keep: Callable[[int, int], bool]) -> Path:
    """A folder of links to the images of ``archive`` that ``keep(index_in_class, label)``, with a labels.csv."""
    source = ImageFolderDataset(archive)
    key = hashlib.sha1(f"{source.root}:{split}:{part}".encode()).hexdigest()[:12]
    folder = cache_dir("splits") / key
    if (folder / "labels.csv").exists():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    seen: dict[int, int] = {}
    with (tmp / "labels.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "class_index"])
        for n, (path, label) in enumerate(source.samples):
            index, seen[label] = seen.get(label, 0), seen.get(label, 0) + 1
            if keep(index, label):
                name = f"{n:06d}{path.suffix}"
                (tmp / name).symlink_to(path)
                writer.writerow([name, label])
    try:
        tmp.rename(folder)
    except OSError:  # another process made it first
        shutil.rmtree(tmp)
    return folder
