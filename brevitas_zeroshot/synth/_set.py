"""A materialised calibration set: normalised images, their target labels, metadata; saved as safetensors shards."""

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from .._errors import BzqError
from .._files import WRITER, read_own_record, refuse_foreign, write_atomic

__all__ = [
    "SetMismatch",
    "CalibrationSet",
    "SyntheticSet",
    "model_fingerprint",
    "MANIFEST",
    "own_manifest",
    "set_files",
]

MANIFEST = "manifest.json"
PREVIEW = "preview.png"
FORMAT_VERSION = 1


class SetMismatch(BzqError):
    """The folder holds a different synthetic set from the one asked for."""


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's state dict (names, shapes and values): the set is only valid for this model."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def set_meta(source: str, model: nn.Module, data_config: dict, seed: int) -> dict:
    """What identifies any calibration set: where it came from, for which model and input."""
    return {
        "format_version": FORMAT_VERSION,
        "writer": WRITER,
        "source": source,
        "model": getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__),
        "fingerprint": model_fingerprint(model),
        "input_size": list(data_config["input_size"]),
        "mean": list(data_config["mean"]),
        "std": list(data_config["std"]),
        "seed": seed,
    }


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def write_shard(path: Path, images: torch.Tensor, labels: torch.Tensor, meta: dict) -> None:
    """Write atomically: a crash leaves either the whole shard or none."""
    tensors = {"images": images.detach().cpu().contiguous(), "labels": labels.detach().cpu().long().contiguous()}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)}))


def own_manifest(folder: Path) -> dict | None:
    """The manifest of the set bzq wrote in ``folder``; None when there is none; refused when it is not bzq's."""
    return read_own_record(folder / MANIFEST, ("format_version", "fingerprint", "source"))


def set_files(folder: Path) -> list[str]:
    """The names of the files bzq writes in a set folder that are there now."""
    names = [MANIFEST, PREVIEW, *(p.name for p in folder.glob("shard-*.safetensors"))]
    return [n for n in names if (folder / n).exists()]


def read_shard(path: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        tensors = load_file(str(path))
        return tensors["images"], tensors["labels"], meta
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise BzqError(f"shard '{path}' is damaged ({e}); delete it and rerun `bzq generate` to remake it.") from e


def read_shard_meta(path: Path) -> dict:
    """The per-batch summary stored in a shard's header (cheap: the tensors are not read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {}).get("meta", "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise BzqError(f"shard '{path}' is damaged ({e}); delete it and rerun `bzq generate` to remake it.") from e


def read_manifest(folder: Path) -> dict:
    manifest = own_manifest(folder)
    if manifest is None:
        raise BzqError(f"'{folder}' holds no synthetic set ({MANIFEST} is missing).")
    return manifest


def write_manifest(folder: Path, manifest: dict) -> None:
    write_atomic(folder / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2)))


@dataclass
class CalibrationSet(Dataset):
    """Calibration images in the model's normalised input space, with their labels and metadata: a
    ``torch.utils.data.Dataset`` of ``(image, label)``, whatever the source (synthesised, real, noise).

    ``DataLoader(calibration_set, batch_size=32)`` works, with samplers and ``Subset``. ``loader()`` always yields
    the same ``(images, labels)`` batches in the same order, so toolkits that pass over the calibration data many
    times (Brevitas GPTQ: once per layer) see one fixed set.
    """

    images: torch.Tensor
    labels: torch.Tensor
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def loader(self, batch_size: int = 32) -> "SetLoader":
        """A re-iterable, deterministic loader of ``(images, labels)`` batches."""
        return SetLoader(self, batch_size)

    @torch.no_grad()
    def forward_loop(self, model: nn.Module, batch_size: int = 32) -> None:
        """Run ``model`` over every image once (e.g. inside a calibration context, or as ModelOpt's forward_loop)."""
        device = next(iter(model.parameters()), torch.empty(0)).device
        for images, _ in self.loader(batch_size):
            model(images.to(device))

    def example_inputs(self, n: int = 1) -> tuple[torch.Tensor]:
        """Example inputs for ``torch.export.export``."""
        return (self.images[:n].clone(),)

    def save(self, folder: str | Path, shard_size: int = 256) -> Path:
        """Write shards, a JSON manifest and a PNG preview grid to ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        old = own_manifest(folder)
        if old is None:
            shards = [shard_name(i) for i in range(-(-len(self) // shard_size))]
            refuse_foreign(folder, [MANIFEST, PREVIEW, *shards], "is not part of a bzq set")
        elif old.get("fingerprint") != self.meta.get("fingerprint"):
            raise BzqError(f"'{folder}' already holds a different synthetic set; choose another folder.")
        shards = []
        for i, start in enumerate(range(0, len(self), shard_size)):
            end = min(start + shard_size, len(self))
            write_shard(folder / shard_name(i), self.images[start:end], self.labels[start:end], {})
            shards.append({"file": shard_name(i), "start": start, "count": end - start})
        write_manifest(folder, {**self.meta, "shards": shards, "complete": True, "num_images": len(self)})
        save_preview(self.images, self.meta, folder / PREVIEW)
        return folder

    @classmethod
    def load_unchecked(cls, folder: Path, manifest: dict) -> "CalibrationSet":
        parts = [read_shard(folder / s["file"]) for s in manifest["shards"]]
        images = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        if images.shape[0] != manifest["num_images"]:
            raise BzqError(
                f"'{folder}' should hold {manifest['num_images']} images, its shards hold {images.shape[0]}."
            )
        meta = {k: v for k, v in manifest.items() if k not in ("shards", "complete")}
        return cls(images, labels, meta)

    @classmethod
    def load(
        cls, folder: str | Path, model: nn.Module | None = None, data_config: dict | None = None
    ) -> "CalibrationSet":
        """Read a set written by ``save``/``generate``; with ``model``/``data_config``, refuse one made for another."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        if not manifest.get("complete"):
            raise BzqError(f"the synthetic set in '{folder}' is unfinished; rerun the same `bzq generate` to resume.")
        check_compatible(manifest, folder, model, data_config)
        return cls.load_unchecked(folder, manifest)


SyntheticSet = CalibrationSet  # the earlier name; it also holds real images and noise


class SetLoader:
    """Batches of a CalibrationSet, re-iterable (a DataLoader stand-in without workers or shuffling)."""

    def __init__(self, dataset: CalibrationSet, batch_size: int):
        self.dataset = dataset
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.dataset), self.batch_size):
            end = start + self.batch_size
            yield self.dataset.images[start:end], self.dataset.labels[start:end]


def check_compatible(manifest: dict, folder: Path, model: nn.Module | None, data_config: dict | None) -> None:
    if data_config is not None:
        want = list(data_config["input_size"])
        if list(manifest.get("input_size", [])) != want:
            raise BzqError(
                f"the synthetic set in '{folder}' has input size {manifest.get('input_size')}, "
                f"the model expects {want}; generate a set for this model."
            )
    if model is not None and manifest.get("fingerprint") not in (None, model_fingerprint(model)):
        raise BzqError(
            f"the synthetic set in '{folder}' was made for another model ({manifest.get('model', 'unknown')}, "
            f"fingerprint {manifest.get('fingerprint')}); generate a set for this model."
        )


def save_preview(images: torch.Tensor, meta: dict, path: Path, n: int = 64) -> None:
    """A PNG grid of the first ``n`` images, de-normalised to pixels."""
    from torchvision.utils import save_image

    x = images[:n].float()
    mean = torch.tensor(meta.get("mean", (0.0, 0.0, 0.0))).view(1, -1, 1, 1)
    std = torch.tensor(meta.get("std", (1.0, 1.0, 1.0))).view(1, -1, 1, 1)
    grid = (x * std + mean).clamp(0, 1)
    if grid.shape[-1] < 64:  # small (CIFAR) images: enlarge so the grid can be seen
        grid = torch.nn.functional.interpolate(grid, scale_factor=3, mode="nearest")
    nrow = int(len(grid) ** 0.5 + 0.999)
    write_atomic(path, lambda tmp: save_image(grid, str(tmp), nrow=nrow, padding=2, format="png"))
