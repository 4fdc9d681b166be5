"""The ``bzq`` command line. Heavy imports live inside the commands so ``--help`` stays fast."""

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from ._errors import BzqError

app = typer.Typer(
    name="bzq",
    help="Zero-shot post-training quantization of image classifiers with images synthesised from BatchNorm statistics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks (not tests): synthesis speed.", no_args_is_help=True)
recipe_app = typer.Typer(help="Tested recipes for the timm model zoo (not available yet).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(recipe_app, name="recipe")

_debug = False

ModelArg = Annotated[str, typer.Argument(help="timm model name (cifar_resnet20, tf_efficientnet_lite0, hf-hub:...).")]
CheckpointOpt = Annotated[
    Path | None, typer.Option("--checkpoint", help="State-dict file to load instead of pretrained weights.")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N, or auto (CUDA when present).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
) -> None:
    global _debug
    _debug = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO, format="%(message)s", stream=sys.stderr, force=True
    )
    for noisy in ("torch", "timm", "brevitas", "torchao", "httpx", "huggingface_hub"):
        # A hub miss logs every retry; the one-line error says what went wrong.
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.ERROR)


def _not_yet(what: str) -> None:
    raise BzqError(f"{what} is not available in brevitas-zeroshot {_version()} yet.")


def _version() -> str:
    from .version import __version__

    return __version__


def _emit(result: dict, as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps(result))
        return
    print(title)
    for key, value in result.items():
        print(f"  {key:>10}: {value:.3f}" if isinstance(value, float) else f"  {key:>10}: {value}")


@app.command("eval")
def eval_cmd(
    model: ModelArg,
    data: Annotated[Path, typer.Option("--data", help="Image folder: <class>/<image> layout or labels.csv.")],
    checkpoint: CheckpointOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Data-loading processes.")] = 2,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Evaluate only the first N images.")] = None,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Top-1/top-5 of a model on a real labelled image folder, with the model's own timm eval transform."""
    from ._evaluate import evaluate
    from .data import create_loader
    from .models import load_model

    if Path(model).is_dir():
        _not_yet("Evaluating a quantized output directory (written by `bzq quantize`)")
    net, data_config = load_model(model, checkpoint=checkpoint)
    loader = create_loader(data, data_config, batch_size=batch_size, workers=workers, limit=limit)
    from ._utils import resolve_device

    result = evaluate(net.to(resolve_device(device)), loader, device=device)
    _emit({"model": model, **result}, as_json, f"{model} on {data}")


@app.command()
def generate(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="Folder for the set (shards, manifest.json, preview.png).")],
    checkpoint: CheckpointOpt = None,
    images: Annotated[int, typer.Option("--images", min=1, help="Number of images.")] = 256,
    iterations: Annotated[int, typer.Option("--iterations", min=0, help="Optimisation steps per batch.")] = 200,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    loss: Annotated[str, typer.Option("--loss", help="BN loss: kl (GZNQ) or l2 (ZeroQ square loss).")] = "kl",
    param: Annotated[
        str, typer.Option("--param", help="distribution (learned per-pixel Gaussian) or pixel (plain pixels).")
    ] = "distribution",
    lr: Annotated[float, typer.Option("--lr", min=0.0)] = 0.1,
    draws: Annotated[int, typer.Option("--draws", min=1, help="Images drawn from each learned distribution.")] = 1,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a different set already in --out.")] = False,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Synthesise a calibration set from BatchNorm statistics. Ctrl-C keeps finished batches; a rerun resumes."""
    from .models import load_model
    from .synth import SyntheticCalibrator
    from .synth._set import MANIFEST, read_manifest

    net, data_config = load_model(model, checkpoint=checkpoint)
    calib = SyntheticCalibrator(
        net,
        data_config,
        device,
        num_images=images,
        iterations=iterations,
        batch_size=batch_size,
        seed=seed,
        bn_loss=loss,
        parameterization=param,
        lr=lr,
        draws=draws,
    )
    try:
        result = calib.generate(out, overwrite=overwrite)
    except KeyboardInterrupt:
        kept = len(list(out.glob("shard-*.safetensors"))) if (out / MANIFEST).exists() else 0
        raise BzqError(
            f"interrupted: {kept} finished batches are kept in '{out}'; rerun the same command to resume."
        ) from None
    meta = read_manifest(out)
    batches = meta.get("batches", [])
    summary = {
        "out": str(out),
        "images": len(result),
        "bn_loss_start": sum(b["bn_loss_start"] for b in batches) / max(len(batches), 1),
        "bn_loss_final": sum(b["bn_loss_final"] for b in batches) / max(len(batches), 1),
        "target_hit_rate": sum(b["target_hit_rate"] for b in batches) / max(len(batches), 1),
        "restarts": meta.get("restarts", 0),
        "seconds": meta.get("synthesis_seconds"),
    }
    _emit(summary, as_json, f"synthetic set for {model}")


@app.command()
def quantize() -> None:
    """Quantize a model with Brevitas or PT2E calibrated on synthetic images (not available yet)."""
    _not_yet("`bzq quantize`")


@app.command()
def push() -> None:
    """Publish a quantized output directory to the Hugging Face Hub (not available yet)."""
    _not_yet("`bzq push`")


@recipe_app.command("list")
def recipe_list() -> None:
    """List the recipes in recipes/ (not available yet)."""
    _not_yet("`bzq recipe list`")


@recipe_app.command("run")
def recipe_run() -> None:
    """Run a recipe file (not available yet)."""
    _not_yet("`bzq recipe run`")


@bench_app.command("synthesis")
def bench_synthesis(
    model: ModelArg,
    checkpoint: CheckpointOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Steps per timing.")] = 10,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Interleaved timings; medians are reported.")] = 3,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="torch CPU threads.")] = None,
    pretrained: Annotated[bool, typer.Option(help="Load pretrained weights (timing does not need them).")] = True,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Time one synthesis step against a bare forward+backward of the same model and batch, and their ratio."""
    import torch

    from .models import load_model
    from .synth._bench import benchmark_synthesis

    if threads:
        torch.set_num_threads(threads)
    net, data_config = load_model(model, checkpoint=checkpoint, pretrained=pretrained)
    result = benchmark_synthesis(net, data_config, batch_size=batch_size, steps=steps, repeats=repeats, device=device)
    _emit(result, as_json, f"synthesis benchmark for {model}")


def main() -> None:
    """Entry point: run the app; report user errors as one line (tracebacks only with --debug)."""
    try:
        app()
    except BzqError as e:
        if _debug:
            raise
        print(f"bzq: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("bzq: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if _debug:
            raise
        print(f"bzq: error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)
