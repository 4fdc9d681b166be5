"""Real labelled image folders: torchvision ImageFolder layout, or a flat folder with ``labels.csv``."""

import csv
import hashlib
import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset

from .._errors import BzqError

__all__ = ["ImageFolderDataset", "create_eval_transform", "create_loader", "open_image_folder", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def cache_dir(kind: str) -> Path:
    """``$BZQ_CACHE/<kind>`` (default ``~/.cache/brevitas_zeroshot/<kind>``)."""
    return Path(os.environ.get("BZQ_CACHE", Path.home() / ".cache" / "brevitas_zeroshot")) / kind


def open_image_folder(path: str | Path) -> Path:
    """The folder itself, or for a ``.tar`` archive of one, its contents unpacked once into a cache folder."""
    path = Path(path)
    if not (path.is_file() and tarfile.is_tarfile(path)):
        return path
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    cache = cache_dir("folders") / key
    if not (cache / ".complete").exists():
        tmp = cache.with_name(key + f".tmp{os.getpid()}")
        try:
            with tarfile.open(path) as tar:
                members = tar.getmembers()
                _check_end_marker(path, tar.offset, len(members))
                tar.extractall(tmp, members=members, filter="data")
        except (tarfile.TarError, EOFError, OSError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise BzqError(
                f"cannot unpack '{path}': {e}; the archive is damaged or truncated, fetch it again."
            ) from None
        (tmp / ".complete").touch()  # the cache appears complete or not at all
        if cache.exists() and not (cache / ".complete").exists():
            shutil.rmtree(cache, ignore_errors=True)  # left by a crash (older versions marked it afterwards)
        try:
            tmp.rename(cache)
        except OSError:  # another process unpacked the same archive first: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else cache


def _check_end_marker(path: Path, end: int, members: int) -> None:
    """A tar archive ends with two zero blocks; one cut between two members reads as a shorter, valid archive."""
    with path.open("rb") as f:
        f.seek(end)
        if f.read(1024) != bytes(1024):
            raise tarfile.ReadError(f"no end-of-archive marker after {members} members")


class ImageFolderDataset(Dataset):
    """Labelled images from a folder, in one of two layouts.

    * ``DIR/<class>/<image>``: classes are the sorted sub-folder names, as torchvision's ImageFolder;
    * ``DIR/labels.csv`` with columns ``file,class_index`` (more columns are ignored) beside the images.

    A ``.tar`` archive of either layout is unpacked once into a cache folder.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None):
        self.root = open_image_folder(root)
        self.transform = transform
        if not self.root.is_dir():
            raise BzqError(f"image folder '{self.root}' does not exist or is not a folder.")
        labels = self.root / "labels.csv"
        self.samples = self._read_csv(labels) if labels.is_file() else self._read_tree()
        if not self.samples:
            raise BzqError(
                f"no images in '{self.root}': expected <class>/<image> sub-folders or a labels.csv "
                f"(file,class_index) beside images ({', '.join(IMAGE_EXTENSIONS)})."
            )

    def _read_csv(self, labels: Path) -> list[tuple[Path, int]]:
        samples, missing = [], []
        with labels.open(newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"file", "class_index"} <= set(reader.fieldnames):
                raise BzqError(f"'{labels}' needs a header with columns file,class_index (got {reader.fieldnames}).")
            for line, row in enumerate(reader, start=2):
                path = self.root / row["file"]
                try:
                    label = int(row["class_index"])
                except (TypeError, ValueError):
                    raise BzqError(
                        f"'{labels}' line {line}: class_index {row['class_index']!r} is not an integer."
                    ) from None
                if not path.is_file():
                    missing.append(row["file"])
                samples.append((path, label))
        if missing:
            raise BzqError(
                f"'{labels}' names {len(missing)} files that are not in '{self.root}' (first: {missing[0]})."
            )
        return samples

    def _read_tree(self) -> list[tuple[Path, int]]:
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        return [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((self.root / name).rglob("*"))
            if _is_image(path)
        ]

    @property
    def num_classes(self) -> int:
        return max(label for _, label in self.samples) + 1

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
        except OSError as e:
            raise BzqError(f"cannot read image '{path}': {e}") from e
        return (self.transform(image) if self.transform else image), label


def create_eval_transform(data_config: dict) -> Callable:
    """The model's own timm eval transform (resize, centre crop, to tensor, normalise)."""
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return create_transform(**{k: data_config[k] for k in keys if k in data_config}, is_training=False)


def create_loader(
    root: str | Path, data_config: dict, batch_size: int = 64, workers: int = 2, limit: int | None = None
) -> DataLoader:
    """A deterministic loader of ``(images, labels)`` over a real image folder, preprocessed for the model."""
    dataset = ImageFolderDataset(root, create_eval_transform(data_config))
    num_classes = data_config.get("num_classes")
    if num_classes and dataset.num_classes > num_classes:
        raise BzqError(f"'{root}' has class index {dataset.num_classes - 1}, but the model has {num_classes} classes.")
    folders = getattr(dataset, "classes", None)  # ImageFolder layout: a label is the folder's sorted position
    if num_classes and folders is not None and len(folders) != num_classes:
        raise BzqError(
            f"'{root}' has {len(folders)} class folders but the model has {num_classes} classes: labels are the "
            "sorted folder positions, so they would be wrong; add the missing class folders (empty ones count) "
            "or give a labels.csv (file,class_index)."
        )
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
