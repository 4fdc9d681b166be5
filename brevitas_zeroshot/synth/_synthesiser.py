"""Synthesiser: calibration images synthesised from a model's BatchNorm statistics (GZNQ)."""

import contextlib
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import BzqError
from .._files import STAGING, refuse_foreign, swap_in
from .._utils import (
    free_memory,
    has_native_bf16,
    keep_freed_memory,
    library_versions,
    progress,
    releases_memory,
    resolve_device,
)
from ..models import resolve_data_config
from ._bn import BN_LOSSES, BNStatistics, check_bn_statistics, find_bn_layers
from ._set import (
    MANIFEST,
    PREVIEW,
    CalibrationSet,
    SetMismatch,
    check_compatible,
    own_manifest,
    read_shard_meta,
    save_preview,
    set_files,
    set_meta,
    shard_name,
    write_manifest,
    write_shard,
)

__all__ = ["SynthesisConfig", "Synthesiser", "balanced_labels"]

INITS = ("diverse", "natural", "noise")


def _distributed() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _summed(t: torch.Tensor, world: int) -> torch.Tensor:
    """``t`` summed over the processes (in place), or ``t`` itself when there is one."""
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def _all_true(flag: torch.Tensor, world: int) -> bool:
    """Whether ``flag`` (a boolean scalar) holds in every process (so that all of them restart a batch, or none)."""
    return bool(_summed((~flag).int(), world) == 0)


def _gathered(x: torch.Tensor, ends: list[int], world: int) -> torch.Tensor:
    """The whole batch from every process's share; process ``r`` holds images ``ends[r-1]:ends[r]``."""
    if world == 1:
        return x
    import torch.distributed as dist

    sizes = [e - s for s, e in zip([0, *ends[:-1]], ends, strict=True)]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


_logger = logging.getLogger(__name__)
# Settings added after sets were first written, with the value that reproduces those sets: an older set with
# otherwise equal settings is the same set (it resumes and is reused).
_ADDED = {"micro_batch": 0, "low_res": 0.0, "precision": "auto"}
_GRAPH_SHARE = 0.8  # of the free memory, the most one pass's graph may take (see _pass_size)
# Revision of what the half-size steps learn (1: full-size images, average-pooled; 2: half-size images, upsampled at
# the switch). A set made with ``low_res`` under another revision is another set; without ``low_res`` all agree.
_LOW_RES_REVISION = 2
# The share of the steps at half size for inputs of 128 px and more: 0.85 and 0.8 were level on the MobileNetV2
# tuning split (W4A8, three seeds; docs/method.md), and 0.85 saves 5 of the 20 costly full-size steps.
LOW_RES_DEFAULT = 0.85


@dataclass
class SynthesisConfig:
    """Settings of the BN-prior generator. Defaults were chosen by measurement (docs/method.md)."""

    num_images: int = 256
    batch_size: int = 128  # statistics are matched over each batch: larger batches give more varied images
    # Optimisation steps per batch. None: 100 for inputs of 128 px and more (with the half-size schedule; level with
    # 200 on the tuning splits of MobileNetV2 and EfficientNet-Lite0 at half the cost, docs/results.md), 200 below.
    iterations: int | None = None
    lr: float = 0.1
    bn_loss: str = "kl"  # "kl" (GZNQ: Gaussian KL per channel) or "l2" (ZeroQ/DeepInversion square loss)
    parameterization: str = "distribution"  # "distribution" (learned per-pixel mean + log-std) or "pixel"
    # Starting images: "diverse" (per-image colour, contrast and smooth structure), "natural" (per-image colour and
    # contrast, with 1/f luminance fields as structure, as in photographs: the image-scale shading the BN loss barely
    # asks for; an option, docs/method.md), or "noise" (white N(0, 1)).
    init: str = "diverse"
    init_std: float = 0.1  # initial per-pixel std of the learned distribution, in normalised units
    draws: int = 1  # images drawn from each learned distribution (distribution parameterisation only)
    bn_weight: float = 1.0
    first_bn_weight: float = 1.0
    ce_weight: float = 0.0  # cross-entropy on the balanced target labels; 0.01-0.1 hurt at W4A4 (docs/method.md)
    tv_weight: float = 0.0
    l2_weight: float = 0.0
    # A random shift (a fraction of the image side) and horizontal flip of each step's batch (DeepInversion). Both
    # hurt at W4A4 on CIFAR; at 224 px they help GPTQ without reconstruction, not under it (docs/method.md).
    jitter: float = 0.0
    flip: bool = False
    crop_scale: float = 1.0  # smallest area of a random resized crop (1.0 = no crop)
    canvas: int = 0  # learn images this many pixels larger on each side; each step sees a random window of them
    blur_sigma: float = 0.0  # Gaussian low-pass (pixels) on every sample: smooth images by construction
    # sigma (pixels) of a 3x3 Gaussian low-pass on the finished images only (0: off). 1.25 (the default until the
    # nineteenth session) won under GPTQ alone; under block reconstruction 0.6 won by 1-7 pt, and without it the two
    # are level (MobileNetV2 W4A8, three seeds; docs/method.md).
    smooth: float = 0.6
    seed: int = 0
    max_restarts: int = 3
    # images per forward pass (0: the whole batch if its graph fits in 80 % of the free memory, else as many as do).
    # The statistics are still those of the whole batch, exactly: moments are averaged over the micro-batches first,
    # then each back-propagates its share. Memory is bounded by the micro-batch; a step costs about 1.5x (one more
    # forward pass). The set is the same to float tolerance.
    micro_batch: int = 0
    # Multi-resolution schedule (DeepInversion): for this fraction of the iterations the images are learned at half
    # their side, about 4x cheaper; then upsampled and learned at full size, the learning rate's cosine restarted.
    # None: LOW_RES_DEFAULT from 128 px, 0 below (the BN statistics of a 16 px CIFAR input mean little).
    low_res: float | None = None
    # The model's forward in bf16 autocast (BN statistics and the loss stay fp32): "bf16", "fp32", or "auto": bf16 on
    # CUDA; on a CPU with native bf16 (AVX512-BF16/AMX) if a timed synthesis step is faster; else fp32. The precision
    # used is recorded in the manifest.
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.bn_loss not in BN_LOSSES:
            raise BzqError(f"bn_loss must be one of {', '.join(BN_LOSSES)}; not {self.bn_loss!r}.")
        if self.parameterization not in ("distribution", "pixel"):
            raise BzqError(f"parameterization must be 'distribution' or 'pixel', not {self.parameterization!r}.")
        for name in ("num_images", "batch_size", "draws"):
            if getattr(self, name) < 1:
                raise BzqError(f"{name} must be at least 1.")
        if self.iterations is not None and self.iterations < 0:
            raise BzqError("iterations must be 0 or more.")
        if self.micro_batch < 0:
            raise BzqError("micro_batch must be 0 (the whole batch, if it fits in memory) or more.")
        if self.batch_size % self.draws:
            raise BzqError(f"batch_size ({self.batch_size}) must be a multiple of draws ({self.draws}).")
        if self.parameterization == "pixel" and self.draws != 1:
            raise BzqError("draws > 1 needs the distribution parameterisation.")
        if self.init not in INITS:
            raise BzqError(f"init must be one of {', '.join(INITS)}; not {self.init!r}.")
        if self.smooth < 0:
            raise BzqError("smooth must be 0 (off) or a positive sigma in pixels.")
        if self.canvas < 0:
            raise BzqError("canvas must be 0 or more pixels.")
        if not 0 <= self.jitter < 1:
            raise BzqError("jitter must be a fraction of the image side in [0, 1).")
        if not 0 < self.crop_scale <= 1:
            raise BzqError("crop_scale must be in (0, 1].")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise BzqError(f"precision must be auto, fp32 or bf16, not {self.precision!r}.")
        if self.low_res is not None and not 0 <= self.low_res < 1:
            raise BzqError("low_res must be a fraction of the iterations in [0, 1).")

    def for_input(self, side: int) -> "SynthesisConfig":
        """This config with the settings left to the input size (``iterations``, ``low_res``: None) resolved for
        images whose shorter side is ``side`` pixels."""
        large = side >= 128  # ImageNet-size inputs: the half-size schedule, and fewer steps under it
        return replace(
            self,
            iterations=(100 if large else 200) if self.iterations is None else self.iterations,
            low_res=(LOW_RES_DEFAULT if large else 0.0) if self.low_res is None else self.low_res,
        )


def _gaussian_kernel(sigma: float, channels: int, device: torch.device, radius: int | None = None) -> torch.Tensor:
    radius = radius or max(1, round(2 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    return (k[:, None] * k[None, :]).expand(channels, 1, -1, -1).contiguous()


def _pink(shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Gaussian fields with a 1/f amplitude spectrum (the power law of photographs), unit std per image and channel."""
    h, w = shape[-2:]
    fy, fx = torch.fft.fftfreq(h, device=device)[:, None], torch.fft.rfftfreq(w, device=device)[None]
    amplitude = 1 / torch.sqrt(fy**2 + fx**2).clamp(min=1 / max(h, w))
    field = torch.fft.irfft2(torch.fft.rfft2(torch.randn(shape, generator=gen, device=device)) * amplitude, s=(h, w))
    return field / field.std((-2, -1), keepdim=True)


@torch.no_grad()
def _upsampled(t: torch.Tensor, size: tuple[int, int], scale: float = 1.0) -> torch.Tensor:
    """``t`` resized bilinearly to ``size`` and multiplied by ``scale``, channels-last (a new leaf)."""
    t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return (t * scale).contiguous(memory_format=torch.channels_last)


def balanced_labels(num_images: int, num_classes: int, seed: int, group: int = 1) -> torch.Tensor:
    """Target classes covering every class equally (up to one), in a seeded order; ``group`` images share one."""
    slots = -(-num_images // group)
    g = torch.Generator().manual_seed(seed)
    per_slot = (torch.arange(slots) % max(num_classes, 1))[torch.randperm(slots, generator=g)]
    return per_slot.repeat_interleave(group)[:num_images]


class Synthesiser:
    """Synthesise a calibration set for ``model`` from its BatchNorm statistics alone.

    Each batch of images is optimised so that the per-channel distribution of every BN layer's input matches the
    Gaussian described by that layer's running mean and variance (optionally, with ``ce_weight``, also that the
    model classifies them as their balanced target classes). By default the images are samples of a learned
    per-pixel Gaussian (reparameterised at every step), so the set is a draw from a generative model, not fixed
    points.

    Args:
        model: the float model with its BatchNorm layers (before any BN folding). It is used in eval mode and
            left as it was found (mode, parameters and BN statistics).
        data_config: input size, mean and std; defaults to the model's timm data config.
        device: ``cpu``, ``cuda``...; default CUDA when present. The forward runs in bf16 autocast on CUDA and on
            CPUs where it measures faster (``precision``), the statistics kept in fp32.
        source: the name recorded in the manifest (default ``gznq``, or ``bn-<loss>`` for another BN loss).
        groups_per_pass: batches optimised together in one pass, for speed: each keeps its own statistics, random
            draws and loss (the same images on the CPU; on a GPU, where kernels for another batch size sum in another
            order, another draw of equal quality). Default: on CUDA as many as fit in memory (a step there costs
            kernel launches more than pixels), one elsewhere.
        **settings: any field of :class:`SynthesisConfig` (``num_images``, ``iterations``, ``batch_size``, ``seed``...).

    Example::

        calib = Synthesiser(model, num_images=256, iterations=200, seed=0).generate("calib/")
        for images, labels in calib.loader(batch_size=32): ...
    """

    def __init__(
        self,
        model: nn.Module,
        data_config: dict | None = None,
        device: str | torch.device | None = None,
        config: SynthesisConfig | None = None,
        source: str | None = None,
        groups_per_pass: int | None = None,
        **settings,
    ):
        unknown = set(settings) - {f.name for f in fields(SynthesisConfig)}
        if unknown:
            raise BzqError(f"unknown synthesis setting(s): {', '.join(sorted(unknown))}.")
        self.config = SynthesisConfig(**{**(asdict(config) if config else {}), **settings})
        self.model = model
        self.data_config = data_config or resolve_data_config(model)
        self.device = resolve_device(device)
        if groups_per_pass is not None and groups_per_pass < 1:
            raise BzqError("groups_per_pass must be at least 1.")
        self.groups_per_pass = groups_per_pass
        self.source = source or ("gznq" if self.config.bn_loss == "kl" else f"bn-{self.config.bn_loss}")
        self.bn_layers = find_bn_layers(model)
        check_bn_statistics(self.bn_layers)
        if not self.bn_layers:
            raise BzqError(
                f"{type(model).__name__} has no BatchNorm layer with running statistics, so there is nothing to "
                "synthesise images from. Calibrate it with real images (--calib DIR) or noise (--calib gaussian)."
            )
        self.num_classes = int(self.data_config.get("num_classes") or getattr(model, "num_classes", 0) or 0)
        c, h, w = self.data_config["input_size"]
        self.config = self.config.for_input(min(h, w))
        mean = torch.tensor(self.data_config["mean"], dtype=torch.float).view(1, c, 1, 1)
        std = torch.tensor(self.data_config["std"], dtype=torch.float).view(1, c, 1, 1)
        self.low, self.high = ((0 - mean) / std).to(self.device), ((1 - mean) / std).to(self.device)
        self.history: list[torch.Tensor] = []  # BN loss per iteration, one tensor per batch
        self._precisions: dict[str, str] = {}  # of the full-size and half-size steps, decided when synthesis starts
        self._graph_bytes: dict[tuple[int, int], float] = {}  # autograd memory per image, by input side

    # -- public -------------------------------------------------------------------------------------------------

    def manifest(self) -> dict:
        """Everything that identifies the set: model fingerprint, input, full config, versions."""
        return {
            **set_meta(self.source, self.model, self.data_config, self.config.seed),
            "num_classes": self.num_classes,
            "num_images": self.config.num_images,
            "config": asdict(self.config),
            "low_res_revision": _LOW_RES_REVISION if self.config.low_res else 0,
            "bn_layers": [name for name, _ in self.bn_layers],
            "versions": library_versions(),
            "device": str(self.device),
        }

    @releases_memory
    def generate(
        self, out: str | Path | None = None, overwrite: bool = False, show_progress: bool = True
    ) -> CalibrationSet:
        """Synthesise the set; with ``out``, stream each finished batch to disk and resume from what is there.

        Under ``torchrun`` (an initialised ``torch.distributed`` group) every batch is split across the ranks, whose
        BN statistics are summed (the loss is the whole batch's); each batch's seeds derive from (seed, batch index)
        alone, so the set is the same, to float tolerance, whatever the world size. On glibc the process keeps the
        memory it frees from then on (``keep_freed_memory``): about 1.5x faster steps at 224 px on the CPU; the
        free heap goes back to the system when the set is done (``releases_memory``).
        """
        cfg = self.config
        keep_freed_memory()  # the hot loop allocates the same large activations every step
        manifest = self.manifest()
        folder = Path(out) if out is not None else None
        rank, world = _distributed()
        if world > 1 and folder is None:
            raise BzqError("generating with several processes needs an output folder (--out).")
        work = folder
        if folder is not None:
            work, done = self._open_folder(folder, manifest, overwrite) if rank == 0 else (None, None)
            _barrier(world)
            if rank != 0:
                work, done = self._open_folder(folder, manifest, overwrite, write=False)
            if done is not None:
                return done
        labels = balanced_labels(cfg.num_images, self.num_classes, cfg.seed, cfg.draws)
        batches = self._batches()  # every process works on every batch, on its share of the images
        if work is not None:  # a resumed set is finished in the precision it was started in (auto may now differ)
            self._precisions = self._precisions or self._stored_precisions(work)
        images, summaries = [], []
        with self._synthesis_mode(), BNStatistics(self.model, cfg.bn_loss, cfg.first_bn_weight) as stats:
            bar = progress(
                total=len(batches) * cfg.iterations, desc="synthesis", unit="it", disable=not show_progress or rank > 0
            )
            pending = []
            for b in batches:
                path = work / shard_name(b) if work is not None else None
                if path is not None and path.exists():
                    try:
                        read_shard_meta(path)
                        bar.update(cfg.iterations)
                        continue
                    except BzqError as e:
                        _logger.warning("%s: making it again", e)
                pending.append(b)
            for run in self._passes(pending, stats):
                spans = [(b * cfg.batch_size, min((b + 1) * cfg.batch_size, cfg.num_images)) for b in run]
                start = time.perf_counter()
                results = self._synthesise_batches(run, [labels[lo:hi] for lo, hi in spans], stats, bar)
                seconds = (time.perf_counter() - start) / len(run)
                for b, (lo, hi), (x, summary) in zip(run, spans, results, strict=True):
                    summary.update(seconds=round(seconds, 3), precisions=self._precisions, batches_per_pass=len(run))
                    if work is not None:
                        if rank == 0:
                            write_shard(work / shard_name(b), x, labels[lo:hi], summary)
                    else:
                        images.append(x.cpu())
                        summaries.append(summary)
            bar.close()
        manifest["precision"] = self.precision
        if folder is None:
            manifest["batches"] = summaries
            manifest["restarts"] = sum(s["restarts"] for s in summaries)
            manifest["synthesis_seconds"] = round(sum(s["seconds"] for s in summaries), 3)
            return CalibrationSet(torch.cat(images), labels, manifest)
        _barrier(world)
        if rank == 0:
            self._finish_folder(work, folder, manifest)
        _barrier(world)
        return CalibrationSet.load(folder)

    # -- internals ----------------------------------------------------------------------------------------------

    def _batches(self) -> range:
        return range(-(-self.config.num_images // self.config.batch_size))

    def _stored_precisions(self, work: Path) -> dict[str, str]:
        """The per-size precisions recorded by the batches already made in ``work`` ({} if none recorded one)."""
        for b in self._batches():
            path = work / shard_name(b)
            with contextlib.suppress(BzqError):
                if path.exists() and "precisions" in (meta := read_shard_meta(path)):
                    return meta["precisions"]
        return {}

    def _open_folder(
        self, folder: Path, manifest: dict, overwrite: bool, write: bool = True
    ) -> tuple[Path, CalibrationSet | None]:
        """Where to write this set's shards, and the set itself when ``folder`` already holds it complete.

        The same set, unfinished, is resumed in place. A different set bzq wrote is replaced only with
        ``overwrite``, and only once the new one is complete: it is made in ``folder/.bzq-partial`` (resumable)
        and swapped in at the end. Files bzq did not write are never replaced. With ``write`` (one process only)
        folders and the unfinished manifest are written.
        """
        old = own_manifest(folder) if folder.is_dir() else None
        staging = folder / STAGING
        key = (manifest["fingerprint"], manifest["config"], manifest["low_res_revision"])

        def key_of(record: dict | None) -> tuple | None:  # settings added since a set was made: their old behaviour
            if record is None:
                return None
            config = {**_ADDED, **(record.get("config") or {})}
            return record.get("fingerprint"), config, record.get("low_res_revision", 1 if config["low_res"] else 0)

        if old is None:
            if folder.is_dir():
                refuse_foreign(folder, [PREVIEW, *map(shard_name, self._batches())], "is not part of a bzq set")
                if any(p.name != STAGING for p in folder.iterdir()) and not overwrite:
                    raise BzqError(
                        f"'{folder}' is not empty and holds no synthetic set; choose an empty or new folder "
                        "(with --overwrite the set is written beside the files there, which are left alone)."
                    )
            work = folder
        elif key_of(old) == key:
            if old.get("complete"):
                check_compatible(old, folder, self.model, self.data_config)
                if write and staging.exists():
                    shutil.rmtree(staging)
                return folder, CalibrationSet.load(folder)
            work = folder
        elif not overwrite:
            raise SetMismatch(
                f"'{folder}' holds a different synthetic set (model {old.get('model')}, seed {old.get('seed')}, "
                f"{old.get('num_images')} images); choose another --out, or pass --overwrite to replace it once the "
                "new set is complete."
            )
        else:
            work = staging
            partial = own_manifest(staging) if staging.is_dir() else None
            if write and staging.exists() and key_of(partial) != key:
                shutil.rmtree(staging)  # an earlier replacement with other settings: all bzq's own
        if write:
            work.mkdir(parents=True, exist_ok=True)
            if own_manifest(work) is None:
                write_manifest(work, {**manifest, "complete": False})
        return work, None

    def _finish_folder(self, work: Path, folder: Path, manifest: dict) -> None:
        """Write the complete manifest and preview (one process); swap a replacement set in."""
        cfg = self.config
        batches = self._batches()
        manifest["batches"] = [read_shard_meta(work / shard_name(b)) for b in batches]
        manifest["restarts"] = sum(s["restarts"] for s in manifest["batches"])
        manifest["synthesis_seconds"] = round(sum(s.get("seconds", 0.0) for s in manifest["batches"]), 3)
        manifest["shards"] = [
            {
                "file": shard_name(b),
                "start": b * cfg.batch_size,
                "count": min(cfg.batch_size, cfg.num_images - b * cfg.batch_size),
            }
            for b in batches
        ]
        manifest["complete"] = True
        result = CalibrationSet.load_unchecked(work, manifest)
        save_preview(result.images, manifest, work / PREVIEW)
        for leftover in work.glob(".shard-*.tmp*"):  # from a process killed mid-write
            leftover.unlink()
        write_manifest(work, manifest)
        if work != folder:
            swap_in(work, folder, set_files(folder), MANIFEST)

    @contextlib.contextmanager
    def _synthesis_mode(self):
        """Eval mode, frozen parameters, channels_last, the precision decided; everything restored afterwards."""
        model = self.model
        was_training = model.training
        grads = [p.requires_grad for p in model.parameters()]
        device = next(iter(model.parameters())).device
        model.eval().requires_grad_(False).to(self.device)
        channels_last = self.device.type == "cpu" or self.device.type == "cuda"
        if channels_last:
            model.to(memory_format=torch.channels_last)
        try:
            self._precisions = self._precisions or self._decide_precision()
            yield
        finally:
            if channels_last:
                model.to(memory_format=torch.contiguous_format)
            model.to(device).train(was_training)
            for p, g in zip(model.parameters(), grads, strict=True):
                p.requires_grad_(g)

    @property
    def precision(self) -> str | None:
        """The precision used (``bf16``, ``fp32``, or e.g. ``bf16, fp32 at half size``); None until decided (``auto``
        may time a probe when synthesis starts)."""
        if not self._precisions:
            return None
        full, half = self._precisions["full"], self._precisions["half"]
        return full if full == half else f"{full}, {half} at half size"

    def _autocast(self, half_size: bool = False):
        if self._precisions["half" if half_size else "full"] == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _decide_precision(self) -> dict[str, str]:
        """``precision`` resolved for the full-size and the half-size steps. On a CPU, ``auto`` times the synthesis
        step itself (forward with the BN statistics, BN loss, backward; best of 3 on up to 8 images) in bf16 and in
        fp32 at each size, and takes bf16 where it is at least 10 % faster on every process. A bare forward + backward
        misleads: on a Xeon with AMX it was 1.5x faster in bf16 at 224 px while the step was 1.6x slower (before the
        BN kernels took bf16), and at 112 px bf16 is slower."""
        choice = self.config.precision
        if choice == "auto" and self.device.type == "cuda":
            choice = "bf16"
        elif choice == "auto" and (self.device.type != "cpu" or not has_native_bf16()):
            choice = "fp32"
        if choice != "auto":
            return {"full": choice, "half": choice}
        c, h, w = self.data_config["input_size"]
        sides = {"full": (h, w), "half": (h // 2, w // 2)} if self.config.low_res else {"full": (h, w)}

        def best_of_3(side: tuple[int, int], bf16: bool) -> float:
            x = torch.randn(min(self.config.batch_size, 8), c, *side).contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            times = []
            with BNStatistics(self.model, self.config.bn_loss) as stats:
                for _ in range(3):
                    start = time.perf_counter()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        self.model(x)
                    stats.loss().backward()
                    times.append(time.perf_counter() - start)
            return min(times)

        timed = {k: (best_of_3(side, False), best_of_3(side, True)) for k, side in sides.items()}
        slower = torch.tensor([bf16 >= 0.9 * fp32 for fp32, bf16 in timed.values()]).int()  # bf16 not 10 % faster
        slower = _summed(slower, _distributed()[1]).tolist()  # on how many processes
        chosen = {k: "fp32" if n else "bf16" for k, n in zip(timed, slower, strict=True)}
        for k, (fp32, bf16) in timed.items():
            _logger.info("bf16 probe, %s-size step: %.3f s vs fp32 %.3f s; %s", k, bf16, fp32, chosen[k])
        return {"half": chosen["full"], **chosen}

    def _passes(self, pending: list[int], stats: BNStatistics) -> list[list[int]]:
        """``pending`` batches cut into runs synthesised in one pass each: consecutive batches of one size, as many as
        ``groups_per_pass`` allows. On CUDA (auto) that is as many as fit in the free memory at full size: a step
        there is bound by kernel launches, not pixels, so G batches in one pass cost little more than one
        (docs/results.md). Elsewhere, under torchrun and with ``micro_batch``, one batch per pass."""
        cfg = self.config
        if not pending or cfg.micro_batch or _distributed()[1] > 1:
            most = 1
        elif self.groups_per_pass is not None:
            most = self.groups_per_pass
        elif self.device.type == "cuda":
            n, side = min(cfg.batch_size, cfg.num_images), tuple(self.data_config["input_size"][1:])
            most = max(1, self._pass_size(n * len(pending), side, stats, self._autocast()) // n)
        else:
            most = 1
        runs: list[list[int]] = []

        def size(b: int) -> int:
            return min(cfg.batch_size, cfg.num_images - b * cfg.batch_size)

        for b in pending:
            if runs and len(runs[-1]) < most and runs[-1][-1] == b - 1 and size(runs[-1][0]) == size(b):
                runs[-1].append(b)
            else:
                runs.append([b])
        return runs

    def _synthesise_batches(
        self, indices: list[int], labels: list[torch.Tensor], stats: BNStatistics, bar
    ) -> list[tuple[torch.Tensor, dict]]:
        """Synthesise the batches ``indices`` in one pass; a batch whose loss turns non-finite is made again (only it,
        the others are done) with half the learning rate, up to ``max_restarts`` times."""
        lr, done, todo = self.config.lr, {}, list(indices)
        for attempt in range(self.config.max_restarts + 1):
            results = self._optimise(todo, [labels[indices.index(b)] for b in todo], stats, bar, lr)
            for b, (x, summary) in zip(todo, results, strict=True):
                if x is not None:
                    done[b] = (x, {**summary, "restarts": attempt})
            todo = [b for b in todo if b not in done]
            if not todo:
                return [done[b] for b in indices]
            for b in todo:
                _logger.warning("batch %d: loss became non-finite; restarting it with lr %.3g", b, lr / 2)
            lr /= 2
        raise BzqError(
            f"batch {todo[0]}: the loss stayed non-finite after {self.config.max_restarts} restarts; try a lower --lr."
        )

    def _optimise(self, indices, labels, stats, bar, lr) -> list[tuple[torch.Tensor | None, dict]]:
        """Optimise the batches ``indices`` (of equal size) together: their images in one pass, each batch's
        statistics, random draws and loss its own (``stats.groups``): on the CPU each comes out as it would alone; on
        a GPU, where other kernels sum in another order, as another draw of equal quality (docs/method.md). A batch
        whose loss turns non-finite comes back as None."""
        stats.groups = len(indices)
        try:
            return self._optimise_groups(indices, labels, stats, bar, lr)
        finally:
            stats.groups = 1

    def _optimise_groups(self, indices, labels, stats, bar, lr) -> list[tuple[torch.Tensor | None, dict]]:
        """The body of ``_optimise`` (which sets and resets ``stats.groups`` around it)."""
        cfg, dev, groups = self.config, self.device, len(indices)
        n = labels[0].numel()
        slots = -(-n // cfg.draws)
        c, h, w = self.data_config["input_size"]
        seeds = [cfg.seed * 1_000_003 + b for b in indices]  # a batch is the same whatever else is generated
        gens = [torch.Generator(dev).manual_seed(seed) for seed in seeds]
        rngs = [random.Random(seed) for seed in seeds]
        # Under torchrun each process optimises its share of the batch's images (whole slots); the statistics are
        # those of the whole batch (all-reduced). Every process draws the whole batch's random numbers and keeps
        # its share, so the images do not depend on the number of processes (to float tolerance). (One batch per
        # pass there.)
        rank, world = _distributed()
        s0, s1 = slots * rank // world, slots * (rank + 1) // world
        i0, i1 = min(s0 * cfg.draws, n), min(s1 * cfg.draws, n)
        target = torch.cat([t.to(dev)[i0:i1] for t in labels])
        pad = cfg.canvas
        switch = round(cfg.low_res * cfg.iterations)  # the first full-size step
        # Until `switch` the images are learned at half their side: every per-pixel cost (sampling, Adam, the
        # augmentation), not only the model's, is a quarter; then they are upsampled and refined at full size.
        side, margin = ((h // 2, w // 2), pad // 2) if switch else ((h, w), pad)
        shape = (slots, c, side[0] + 2 * margin, side[1] + 2 * margin)
        mean = torch.cat([self._init_images(shape, gen)[s0:s1] for gen in gens])
        mean = torch.max(torch.min(mean, self.high), self.low).contiguous(memory_format=torch.channels_last)
        params = [mean.requires_grad_()]
        distribution = cfg.parameterization == "distribution"
        if distribution:
            params.append(torch.full_like(mean, math.log(cfg.init_std)).requires_grad_())
        fused = dev.type in ("cpu", "cuda")  # one pass: 2x cheaper on the CPU
        opt = torch.optim.Adam(params, lr=lr, fused=fused)
        history = torch.zeros(cfg.iterations + 1, groups, device=dev)
        finite = torch.ones(groups, dtype=torch.bool, device=dev)
        amp = self._autocast(half_size=bool(switch))

        def blur_kernel(scale: int) -> torch.Tensor | None:
            return _gaussian_kernel(cfg.blur_sigma / scale, c, dev) if cfg.blur_sigma > 0 else None

        blur = blur_kernel(2 if switch else 1)

        def sample() -> torch.Tensor:
            mean = params[0]
            if distribution:
                eps = [torch.randn((slots, cfg.draws, *mean.shape[1:]), generator=g, device=dev)[s0:s1] for g in gens]
                eps = eps[0] if groups == 1 else torch.cat(eps)
                x = (mean[:, None] + params[1].exp()[:, None] * eps).flatten(0, 1)  # slot-major, as labels
                x = x if groups > 1 else x[: i1 - i0]  # (batches passed together are whole: no partial slot)
            else:
                x = mean
            if blur is not None:
                k = blur.shape[-1] // 2
                x = F.conv2d(F.pad(x, (k,) * 4, mode="reflect"), blur, groups=c)
            return torch.max(torch.min(x, self.high), self.low) if distribution or blur is not None else x

        def full_size() -> None:
            """The half-size parameters, and Adam's moments of them, upsampled to full size: the optimisation goes on
            (a full-size pixel's gradient is about a quarter of its half-size pixel's)."""
            nonlocal opt, blur, side, margin, amp
            side, margin, blur, amp = (h, w), pad, blur_kernel(1), self._autocast()
            old, state, size = list(params), opt.state, (h + 2 * pad, w + 2 * pad)
            params[:] = [_upsampled(p, size).requires_grad_() for p in old]
            opt = torch.optim.Adam(params, lr=lr, fused=fused)
            for p, q in zip(old, params, strict=True):
                if p in state:
                    s = state[p]
                    opt.state[q] = {
                        "step": s["step"],
                        "exp_avg": _upsampled(s["exp_avg"], size, 1 / 4),
                        "exp_avg_sq": _upsampled(s["exp_avg_sq"], size, 1 / 16),
                    }

        def pass_size() -> int:  # several batches per pass only where they fit whole (see _passes)
            return self._pass_size(i1 - i0, side, stats, amp) if groups == 1 else groups * n

        def per_batch(x: torch.Tensor, fn) -> torch.Tensor:
            """``fn(images, rng)`` applied to each batch's images with its own random draws."""
            if groups == 1:
                return fn(x, rngs[0])
            return torch.cat([fn(part, rng) for part, rng in zip(x.chunk(groups), rngs, strict=True)])

        def window(x: torch.Tensor, rng: random.Random) -> torch.Tensor:  # drawn in Python: no device sync
            top, left = rng.randint(0, 2 * margin), rng.randint(0, 2 * margin)
            return x[..., top : top + side[0], left : left + side[1]]

        augments = cfg.flip or cfg.jitter or cfg.crop_scale < 1
        size = pass_size()
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(switch or cfg.iterations, 1))
        for step in range(cfg.iterations):
            if step == switch and step:
                full_size()
                sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.iterations - switch)
                size = pass_size()
            x = sample()
            if margin:  # one random window for each batch
                x = per_batch(x, window)
            opt.zero_grad(set_to_none=True)
            xa = per_batch(x, self._augment) if augments else x
            if world > 1 or size < len(xa):
                loss, bn = self._group_backward(x, xa, target, stats, amp, n, size)
                rest = loss
            else:
                with amp:
                    logits = self.model(xa)
                bn = stats.loss()  # one per batch with several batches
                # means over all the images; times the batches, the sum of the batches' own
                rest = groups * self._image_terms(x, logits, target)
                loss = cfg.bn_weight * bn.sum() + rest
                loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                params[0].copy_(torch.max(torch.min(params[0], self.high), self.low))
                history[step] = bn.detach()
                finite &= torch.isfinite(bn)  # a batch's own, so that only it is made again
                if torch.is_tensor(rest):
                    finite &= torch.isfinite(rest)
            if step % 25 == 24 or step == cfg.iterations - 1:
                if not _all_true(finite.any(), world):  # a batch gone bad goes on (apart) until all have
                    bar.update((cfg.iterations - step - 1) * groups)
                    return [(None, {})] * groups
                bar.set_postfix(batch=indices[0], bn=f"{bn.mean().item():.4f}")
            bar.update(groups)

        if side != (h, w):  # every step was a half-size one
            full_size()
            size = pass_size()
        with torch.no_grad():
            x = sample().detach()[..., pad : pad + h, pad : pad + w]
            if cfg.smooth > 0:  # GPTQ and bias correction otherwise fit the pixel noise the BN loss leaves in
                k = _gaussian_kernel(cfg.smooth, c, dev, radius=1)
                x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), k, groups=c)
            x = x.contiguous(memory_format=torch.channels_last)
            if groups == 1:
                moments, logits = self._group_moments(x, stats, amp, n, size)
            else:
                with amp:
                    logits = self.model(x)
                moments = stats.moments()
            per_channel = stats.channel_loss(moments)
            history[cfg.iterations] = (per_channel * stats.channel_weight).sum(-1)
            hits = torch.zeros(groups, device=dev)
            if len(x):
                hits = (logits.float().argmax(1) == target).view(groups, -1).sum(1).float()
            hits = _summed(hits, world)
            x = _gathered(x, [min(slots * (r + 1) // world * cfg.draws, n) for r in range(world)], world)
        history, finite, per_channel = history.cpu(), finite.tolist(), per_channel.view(groups, -1)
        results = []
        for g, b in enumerate(indices):
            if not finite[g]:
                results.append((None, {}))
                continue
            self.history.append(history[:, g])
            summary = {
                "batch": b,
                "bn_loss_start": float(history[0, g]) if cfg.iterations else float(history[-1, g]),
                "bn_loss_final": float(history[-1, g]),
                "bn_loss_per_layer": [round(float(v), 6) for v in stats.per_layer(per_channel[g])],
                "bn_loss_trace": [round(v, 6) for v in history[::10, g].tolist()],  # every 10th step, for plots
                "target_hit_rate": float(hits[g] / n),
            }
            results.append((x[g * n : (g + 1) * n].contiguous().float().cpu(), summary))
        return results

    def _pass_size(self, images: int, side: tuple[int, int], stats: BNStatistics, amp) -> int:
        """Images per forward pass with a graph: ``micro_batch`` if set; else all ``images``, unless their graph would
        take more than 80 % of the free memory (the process's own unused heap counted as free), then as many as fit
        (the batch's statistics are still matched exactly). The graph's size per image is measured once per input
        side: what autograd saves for 2 images, x1.5 for the gradients flowing back (the peak of a 128-image
        MobileNetV2 step at 224 px was 1.15x what it saves)."""
        if self.config.micro_batch:
            return self.config.micro_batch
        free = free_memory(self.device)
        if free is None or not images:
            return max(images, 1)
        if side not in self._graph_bytes:
            saved = []
            probe = torch.zeros(2, self.data_config["input_size"][0], *side, device=self.device)
            probe = probe.contiguous(memory_format=torch.channels_last).requires_grad_()
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t), amp:
                self.model(probe)
            stats.moments()  # the probe's, discarded
            self._graph_bytes[side] = 1.5 * sum(saved) / 2
        fits = int(_GRAPH_SHARE * free / self._graph_bytes[side])
        if fits < images:
            _logger.info("%d images at %dx%d do not fit in memory at once: passes of %d", images, *side, max(fits, 1))
        return max(1, min(images, fits))

    def _image_terms(self, x: torch.Tensor, logits: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor | float:
        """The optional per-image loss terms (cross-entropy unless ``logits`` is None, total variation, L2), as means
        over ``x``."""
        cfg, loss = self.config, 0.0
        if cfg.ce_weight and logits is not None:
            loss = loss + cfg.ce_weight * F.cross_entropy(logits.float()[: target.numel()], target)
        if cfg.tv_weight:
            tv = (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean() + (x[..., 1:] - x[..., :-1]).pow(2).mean()
            loss = loss + cfg.tv_weight * tv
        if cfg.l2_weight:
            loss = loss + cfg.l2_weight * x.pow(2).mean()
        return loss

    def _group_moments(
        self, x: torch.Tensor, stats: BNStatistics, amp, n: int, size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BN input moments of the whole batch of ``n`` images, of which this process holds ``x`` (passes of
        ``size`` images; summed over processes), and the logits of ``x``. No graph is kept."""
        size = max(size, 1)
        moments, logits = torch.zeros(2, stats.run_mean.numel(), device=self.device), []
        with torch.no_grad():
            for chunk in x.split(size):
                with amp:
                    logits.append(self.model(chunk))
                moments += stats.moments() * (len(chunk) / n)
        return _summed(moments, _distributed()[1]), torch.cat(logits) if logits else x.new_zeros(0)

    def _group_backward(self, x, xa, target, stats, amp, n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Back-propagate the loss of a whole batch of ``n`` images, of which this process holds ``xa`` (``x``
        before augmentation), exactly. One pass: the local moments are summed with the other processes' (whose
        share enters without a gradient). With ``micro_batch``: the batch's moments first, without a graph, then
        the loss's gradient with respect to them, then each micro-batch back-propagates that gradient through its
        own share of the moments. Returns the loss and the BN loss (detached)."""
        cfg, world = self.config, _distributed()[1]
        share = len(xa) / n
        if size >= len(xa):
            logits = None
            local = torch.zeros(2, stats.run_mean.numel(), device=self.device)
            if len(xa):
                with amp:
                    logits = self.model(xa)
                local = stats.moments() * share
            total = _summed(local.detach().clone(), world)
            bn = stats.loss(local + (total - local.detach()))
            loss = cfg.bn_weight * bn
            if len(xa):
                loss = loss + share * self._image_terms(x, logits, target)
                loss.backward()
            return loss.detach(), bn.detach()
        leaf = xa.detach().requires_grad_()
        moments, _ = self._group_moments(leaf, stats, amp, n, size)
        moments.requires_grad_()
        bn = stats.loss(moments)
        (grad_moments,) = torch.autograd.grad(cfg.bn_weight * bn, moments)
        start = 0
        for chunk in leaf.split(size):
            with amp:
                logits = self.model(chunk)
            part = (grad_moments * stats.moments()).sum() * (len(chunk) / n)
            if cfg.ce_weight:
                labels = target[start : start + len(chunk)]
                part = part + cfg.ce_weight * (len(chunk) / n) * F.cross_entropy(logits.float()[: len(labels)], labels)
            part.backward()
            start += len(chunk)
        extra = share * self._image_terms(x, None, target)  # total variation and L2: means over the images, cheap
        ((xa * leaf.grad).sum() + extra).backward()  # on through the augmentation and sampling to the parameters
        loss = cfg.bn_weight * bn.detach() + (extra.detach() if torch.is_tensor(extra) else extra)
        return loss, bn.detach()

    def _init_images(self, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        """Starting images. "diverse" gives every image its own colour offset, contrast and smooth structure, so the
        set starts as varied as real images are (white noise makes every image alike, and they stay alike)."""
        dev = self.device
        if self.config.init == "noise":
            return torch.randn(shape, generator=gen, device=dev)
        n, c, h, w = shape
        natural = self.config.init == "natural"
        offset = 0.5 * torch.randn((n, c, 1, 1), generator=gen, device=dev)
        contrast = (0.5 if natural else 0.25) + 0.75 * torch.rand((n, 1, 1, 1), generator=gen, device=dev)
        if natural:
            # one luminance field shared by the channels, and a weaker one per channel (colour); / 1.08 ≈ √(1 + 0.4²)
            return offset + contrast * (_pink((n, 1, h, w), gen, dev) + 0.4 * _pink(shape, gen, dev)) / 1.08
        coarse = torch.randn((n, c, max(2, h // 8), max(2, w // 8)), generator=gen, device=dev)
        smooth = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
        fine = torch.randn(shape, generator=gen, device=dev)
        return offset + contrast * (0.8 * smooth + 0.6 * fine)

    def _augment(self, x: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """One random flip, shift and crop for the whole batch (drawn in Python: no device sync)."""
        cfg = self.config
        h, w = x.shape[-2:]
        if not len(x):  # a process with no share of a small last batch (its random draws affect nothing)
            return x
        if cfg.flip and rng.random() < 0.5:
            x = x.flip(-1)
        if cfg.jitter:
            jy, jx = max(1, int(cfg.jitter * h)), max(1, int(cfg.jitter * w))
            x = torch.roll(x, (rng.randint(-jy, jy), rng.randint(-jx, jx)), (-2, -1))
        if cfg.crop_scale < 1:
            side = math.sqrt(rng.uniform(cfg.crop_scale, 1.0))
            ch, cw = max(1, round(side * h)), max(1, round(side * w))
            top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
            x = F.interpolate(
                x[..., top : top + ch, left : left + cw], size=(h, w), mode="bilinear", align_corners=False
            )
        return x


SyntheticCalibrator = Synthesiser  # the earlier name (it generates; the toolkits calibrate)
