"""PNG figures for the quality benchmark: accuracy per scheme and source, BN loss curves, picture grids."""

import re
from pathlib import Path

import torch

from ..synth._set import MANIFEST, CalibrationSet, read_manifest
from ._quality import _slug, summarise

__all__ = ["write_plots"]


def _scheme_key(scheme: str) -> tuple:
    bits = re.search(r"-w(\d+)a(\d+)", scheme)
    return (scheme.split("-")[0], -int(bits[1]), -int(bits[2])) if bits else (scheme, 0, 0)


def write_plots(results: dict, out: str | Path) -> list[Path]:
    """Write ``accuracy-<task>.png``, ``bn-loss-<task>.png`` and ``grid-<task>.png`` into ``out``; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, written = Path(out), []
    rows = summarise(results)
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task]
        schemes = sorted({r["scheme"] for r in mine}, key=_scheme_key)
        fig, ax = plt.subplots(figsize=(7, 4))
        for source in sorted({r["source"] for r in mine}):
            cells = {c["scheme"]: [] for c in results["cells"]}
            for c in results["cells"]:
                if c["task"] == task and c["source"] == source:
                    cells[c["scheme"]].append(c["top1"])
            xs = [i for i, s in enumerate(schemes) if cells.get(s)]
            means = [sum(cells[schemes[i]]) / len(cells[schemes[i]]) for i in xs]
            errs = [torch.tensor(cells[schemes[i]]).std().nan_to_num().item() for i in xs]
            ax.errorbar(xs, means, yerr=errs, marker="o", capsize=3, label=source)
        fl = results["float"].get(task, {}).get("top1")
        if fl is not None:
            ax.axhline(fl, color="grey", linestyle="--", linewidth=1, label="float")
        ax.set_xticks(range(len(schemes)), schemes, rotation=20, ha="right")
        ax.set_ylabel("top-1 % (held-out real images)")
        ax.set_title(f"{task}: quantized accuracy by calibration source")
        ax.legend(fontsize=8)
        written.append(_save(fig, out / f"accuracy-{_slug(task)}.png"))

        traces = {}
        for c in results["cells"]:
            if c["task"] == task and c["seed"] == min(x["seed"] for x in results["cells"]) and c.get("bn_loss_trace"):
                traces.setdefault(c["source"], c["bn_loss_trace"])
        if traces:
            fig, ax = plt.subplots(figsize=(6, 3.5))
            for source, trace in sorted(traces.items()):
                ax.plot([10 * i for i in range(len(trace))], trace, label=source)
            ax.set_yscale("log")
            ax.set_xlabel("iteration")
            ax.set_ylabel("BN loss (each source's own loss)")
            ax.set_title(f"{task}: BN loss during synthesis (seed {min(c['seed'] for c in results['cells'])})")
            ax.legend(fontsize=8)
            written.append(_save(fig, out / f"bn-loss-{_slug(task)}.png"))

        grid = _picture_grid(out / "sets" / _slug(task))
        if grid is not None:
            labels, image = grid
            fig, ax = plt.subplots(figsize=(8, 0.9 * len(labels) + 0.4))
            ax.imshow(image)
            ax.set_yticks([(i + 0.5) * image.shape[0] / len(labels) for i in range(len(labels))], labels, fontsize=8)
            ax.set_xticks([])
            ax.set_title(f"{task}: first 8 calibration images per source (seed 0)", fontsize=9)
            written.append(_save(fig, out / f"grid-{_slug(task)}.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _picture_grid(task_sets: Path, per_row: int = 8):
    """Rows of the first images of each source's seed-0 set, de-normalised to pixels (H x W x 3 array)."""
    rows, labels = [], []
    for folder in sorted(task_sets.glob("*/seed0")):
        if not (folder / MANIFEST).exists() or not read_manifest(folder).get("complete"):
            continue
        calib = CalibrationSet.load(folder)
        x = calib.images[:per_row].float()
        mean = torch.tensor(calib.meta["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(calib.meta["std"]).view(1, -1, 1, 1)
        x = (x * std + mean).clamp(0, 1)
        x = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        x = torch.cat([x, torch.ones(per_row - len(x), *x.shape[1:])]) if len(x) < per_row else x
        rows.append(torch.cat(list(torch.nn.functional.pad(x, (1, 1, 1, 1), value=1.0)), dim=-1))
        labels.append(folder.parent.name)
    if not rows:
        return None
    return labels, torch.cat(rows, dim=-2).permute(1, 2, 0).numpy()
