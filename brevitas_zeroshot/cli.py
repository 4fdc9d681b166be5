"""The ``bzq`` command line. Heavy imports live inside the commands so ``--help`` stays fast."""

import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from ._errors import BzqError, BzqInterrupted, BzqPartial
from ._utils import keep_freed_memory
from .quant._reconstruct import ReconstructionConfig
from .synth._synthesiser import LOW_RES_DEFAULT, SynthesisConfig

app = typer.Typer(
    name="bzq",
    help="Zero-shot post-training quantization of image classifiers with images synthesised from BatchNorm statistics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(
    help="Benchmarks (not tests): synthesis speed, quantized quality, deployed latency, the zoo matrix.",
    no_args_is_help=True,
)
recipe_app = typer.Typer(help="Tested recipes for the timm model zoo.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(recipe_app, name="recipe")

_debug = False

ModelArg = Annotated[str, typer.Argument(help="timm model name (cifar_resnet20, tf_efficientnet_lite0, hf-hub:...).")]
CheckpointOpt = Annotated[
    Path | None, typer.Option("--checkpoint", help="State-dict file to load instead of pretrained weights.")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N, or auto (CUDA when present).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]

# Synthesis options, declared once for `generate` and `quantize` (defaults: SynthesisConfig's).
_SYN = SynthesisConfig()
IterationsOpt = Annotated[
    int | None,
    typer.Option("--iterations", min=0, help="Synthesis steps per batch (default: 100 from 128 px, else 200)."),
]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images whose statistics are matched together.")]
SeedOpt = Annotated[int, typer.Option("--seed")]
InitOpt = Annotated[
    str, typer.Option("--init", help="diverse (per-image colour, contrast, structure), natural (1/f structure), noise.")
]
LossOpt = Annotated[str, typer.Option("--loss", help="BN loss: kl (GZNQ), kl_forward, or l2 (ZeroQ square loss).")]
ParamOpt = Annotated[
    str, typer.Option("--param", help="distribution (learned per-pixel Gaussian) or pixel (plain pixels).")
]
LrOpt = Annotated[float, typer.Option("--lr", min=0.0, help="Adam learning rate of the synthesis.")]
DrawsOpt = Annotated[int, typer.Option("--draws", min=1, help="Images drawn from each learned distribution.")]
BlurOpt = Annotated[float, typer.Option("--blur", min=0.0, help="Gaussian low-pass sigma in pixels (0: off).")]
MicroBatchOpt = Annotated[
    int,
    typer.Option(
        "--micro-batch",
        min=0,
        help="Images per forward pass (0: the whole batch); the batch's statistics are still matched exactly.",
    ),
]

LowResOpt = Annotated[
    float | None,
    typer.Option(
        "--low-res",
        min=0.0,
        max=0.99,
        help=f"Fraction of the steps at half resolution (~4x cheaper); default {LOW_RES_DEFAULT} from 128 px, else 0.",
    ),
]
JitterOpt = Annotated[
    float,
    typer.Option("--jitter", min=0.0, max=0.99, help="Random shift of each step's images, a fraction of the side."),
]
FlipOpt = Annotated[bool, typer.Option("--flip/--no-flip", help="Mirror each step's images at random.")]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help="auto (bf16 where the CPU has it natively and a timed step is faster; CUDA: bf16), fp32 or bf16. "
        "auto decides on each run: pass fp32 or bf16 for a set that must be reproduced exactly.",
    ),
]


def _synthesis(o: dict) -> dict:
    """SynthesisConfig fields from the synthesis options (their flag names are shorter)."""
    return {
        "iterations": o["iterations"],
        "batch_size": o["batch_size"],
        "init": o["init"],
        "bn_loss": o["loss"],
        "parameterization": o["param"],
        "lr": o["lr"],
        "draws": o["draws"],
        "blur_sigma": o["blur"],
        "micro_batch": o["micro_batch"],
        "low_res": o["low_res"],
        "jitter": o["jitter"],
        "flip": o["flip"],
        "precision": o["precision"],
    }


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
) -> None:
    global _debug
    _debug = debug
    keep_freed_memory()  # synthesis, calibration and evaluation all reallocate large activations
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO, format="%(message)s", stream=sys.stderr, force=True
    )
    for noisy in ("torch", "timm", "brevitas", "torchao", "httpx", "huggingface_hub"):
        # A hub miss logs every retry; the one-line error says what went wrong.
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.ERROR)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _launch_torchrun(nproc: int) -> int:
    """Re-run this command under torchrun with ``nproc`` processes (one thread each on the CPU)."""
    import subprocess

    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    cmd += ["-m", "brevitas_zeroshot", *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(cmd, env=env)


def _init_distributed(device: str) -> int:
    """Join the torchrun group when launched by torchrun (gloo on CPU, nccl on CUDA); returns the rank, or -1."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return -1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device != "cpu" and _cuda() else "gloo")
    return dist.get_rank()


def _is_quantized(name: str) -> bool:
    """Whether a Hub repo holds a model written by ``bzq quantize`` (rather than timm weights)."""
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(name[len("hf-hub:") :], "quant_config.json")
        return True
    except Exception:
        return False


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
    model: Annotated[str, typer.Argument(help="timm model name, or a folder written by `bzq quantize`.")],
    data: Annotated[Path, typer.Option("--data", help="Image folder: <class>/<image> layout or labels.csv.")],
    checkpoint: CheckpointOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Data-loading processes.")] = 2,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Evaluate only the first N images.")] = None,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Top-1/top-5 on a real labelled image folder with the model's timm eval transform.

    MODEL may be a folder written by `bzq quantize`: then agreement and KL against its float model are reported.
    """
    from ._evaluate import evaluate
    from ._utils import resolve_device
    from .data import create_loader
    from .models import load_model
    from .quant import load_quantized, lower_quantized

    dev = resolve_device(device)
    reference, runtime = None, {}
    if Path(model).is_dir() or (model.startswith("hf-hub:") and _is_quantized(model)):
        net, data_config = load_quantized(model)
        backend = net.bzq_meta["quantization"]["backend"]
        if backend != "pt2e":  # an exported program stays where it was saved
            net.to(dev)
        reference, _ = load_model(net.bzq_meta["model"], checkpoint=checkpoint or net.bzq_meta.get("checkpoint"))
        reference.to(dev)
    else:
        net, data_config = load_model(model, checkpoint=checkpoint)
        net.to(dev)
    loader = create_loader(data, data_config, batch_size=batch_size, workers=workers, limit=limit)
    if reference is not None:  # the quantized model as it runs when deployed (a PT2E program: compiled)
        net, runtime["runtime"] = lower_quantized(net, backend, next(iter(loader))[0].to(dev))
    result = evaluate(net, loader, reference=reference, device=dev)
    _emit({"model": model, **result, **runtime}, as_json, f"{model} on {data}")


@app.command()
def generate(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="Folder for the set (shards, manifest.json, preview.png).")],
    checkpoint: CheckpointOpt = None,
    images: Annotated[int, typer.Option("--images", min=1, help="Number of images.")] = 256,
    iterations: IterationsOpt = _SYN.iterations,
    batch_size: BatchSizeOpt = _SYN.batch_size,
    seed: SeedOpt = 0,
    init: InitOpt = _SYN.init,
    loss: LossOpt = _SYN.bn_loss,
    param: ParamOpt = _SYN.parameterization,
    lr: LrOpt = _SYN.lr,
    draws: DrawsOpt = _SYN.draws,
    blur: BlurOpt = _SYN.blur_sigma,
    micro_batch: MicroBatchOpt = _SYN.micro_batch,
    low_res: LowResOpt = _SYN.low_res,
    jitter: JitterOpt = _SYN.jitter,
    flip: FlipOpt = _SYN.flip,
    precision: PrecisionOpt = _SYN.precision,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a different set already in --out.")] = False,
    nproc: Annotated[
        int, typer.Option("--nproc", min=1, help="Processes on this machine (launches torchrun; batches split).")
    ] = 1,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Synthesise a calibration set from BatchNorm statistics. Ctrl-C keeps finished batches; a rerun resumes.

    Runs on several processes under torchrun (`torchrun --nproc-per-node N -m brevitas_zeroshot generate ...`,
    or `--nproc N`): the set is identical whatever the number of processes.
    """
    from ._files import STAGING
    from .models import load_model
    from .synth import Synthesiser
    from .synth._set import read_manifest

    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(_launch_torchrun(nproc))
    rank = _init_distributed(device)
    if rank > 0:
        logging.getLogger().setLevel(logging.WARNING)
    net, data_config = load_model(model, checkpoint=checkpoint)
    if rank >= 0 and device in ("auto", "cuda") and _cuda():
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    calib = Synthesiser(net, data_config, device, num_images=images, seed=seed, **_synthesis(locals()))
    try:
        result = calib.generate(out, overwrite=overwrite)
    except KeyboardInterrupt:
        kept = len(list(out.glob("shard-*.safetensors"))) + len(list((out / STAGING).glob("shard-*.safetensors")))
        raise BzqInterrupted(
            f"interrupted: {kept} finished batches are kept in '{out}'; rerun the same command to resume."
        ) from None
    if rank > 0:
        return
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
def quantize(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="Output folder (model, quant_config.json, results.json).")],
    backend: Annotated[str, typer.Option("--backend", help="brevitas or pt2e.")] = "brevitas",
    w_bits: Annotated[int, typer.Option("--w-bits", help="Weight bits.")] = 8,
    a_bits: Annotated[int, typer.Option("--a-bits", help="Activation bits.")] = 8,
    calib: Annotated[
        str, typer.Option("--calib", help="gznq (ours), zeroq, gaussian, a real image folder, or a generated set.")
    ] = "gznq",
    checkpoint: CheckpointOpt = None,
    images: Annotated[int, typer.Option("--images", min=1, help="Calibration images.")] = 128,
    iterations: IterationsOpt = _SYN.iterations,
    batch_size: BatchSizeOpt = _SYN.batch_size,
    seed: SeedOpt = 0,
    init: InitOpt = _SYN.init,
    loss: LossOpt = _SYN.bn_loss,
    param: ParamOpt = _SYN.parameterization,
    lr: LrOpt = _SYN.lr,
    draws: DrawsOpt = _SYN.draws,
    blur: BlurOpt = _SYN.blur_sigma,
    micro_batch: MicroBatchOpt = _SYN.micro_batch,
    low_res: LowResOpt = _SYN.low_res,
    jitter: JitterOpt = _SYN.jitter,
    flip: FlipOpt = _SYN.flip,
    precision: PrecisionOpt = _SYN.precision,
    eval_data: Annotated[
        Path | None, typer.Option("--eval-data", help="Real labelled images to evaluate float and quantized models.")
    ] = None,
    eval_limit: Annotated[int | None, typer.Option("--eval-limit", min=1, help="Evaluate the first N only.")] = None,
    first_last_bits: Annotated[
        int, typer.Option("--first-last-bits", help="Bits of the first and last layers (brevitas); 0: as the rest.")
    ] = 8,
    gptq: Annotated[
        bool | None, typer.Option("--gptq/--no-gptq", help="GPTQ on weights (default: on below 8 bits).")
    ] = None,
    gpfq: Annotated[
        bool,
        typer.Option("--gpfq", help="GPFQ instead of GPTQ (brevitas); collapsed MobileNetV2 W4A8 (docs/method.md)."),
    ] = False,
    bias_correction: Annotated[
        bool | None,
        typer.Option(
            "--bias-correction/--no-bias-correction",
            help="brevitas: bias correction (default: on without reconstruction, off after it).",
        ),
    ] = None,
    graph: Annotated[str, typer.Option("--graph", help="brevitas: auto, fx or layerwise.")] = "auto",
    reconstruct: Annotated[
        bool | None,
        typer.Option(
            "--reconstruct/--no-reconstruct",
            help="brevitas: block reconstruction, learned rounding + step sizes (default: on below 8 bits).",
        ),
    ] = None,
    reconstruct_iters: Annotated[
        int, typer.Option("--reconstruct-iters", min=1, help="brevitas: reconstruction steps per block.")
    ] = ReconstructionConfig.iterations,
    reconstruct_drop: Annotated[
        float,
        typer.Option(
            "--reconstruct-drop", help="brevitas: QDrop, the chance an activation skips quantization while learning."
        ),
    ] = 0.0,
    quantize_residual_adds: Annotated[
        bool | None,
        typer.Option(
            "--quantize-residual-adds/--float-residual-adds",
            help="brevitas: quantize the inputs of residual adds whose sums are requantized (default: at 8 bits only).",
        ),
    ] = None,
    act_range: Annotated[
        str | None,
        typer.Option(
            "--act-range", help="brevitas: activation ranges by percentile or mse (default: mse with reconstruction)."
        ),
    ] = None,
    target: Annotated[str, typer.Option("--target", help="pt2e: x86 (Inductor) or xnnpack (ExecuTorch).")] = "x86",
    settings: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Any setting of the backend's config, flag or not: --set weight_range=mse (repeatable)."
        ),
    ] = None,
    onnx: Annotated[bool, typer.Option("--onnx/--no-onnx", help="Export ONNX QCDQ (brevitas).")] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a quantized model already in --out.")] = False,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Quantize a model with Brevitas or PT2E, calibrated on synthetic images (or another source).

    Everything is checked before any work; the new result replaces what is in --out only once it is complete.
    """
    from ._pipeline import PipelineConfig
    from ._recipes import parse_quant_settings, recipe_hint
    from .quant._registry import quant_keys

    o = dict(locals())
    config = PipelineConfig(
        **{k: v for k, v in o.items() if k in PipelineConfig.__dataclass_fields__},
        quant={**{k: v for k, v in o.items() if k in quant_keys()}, **parse_quant_settings(settings or [])},
        synthesis=_synthesis(o),
    )
    hint = recipe_hint(config)
    if hint:
        typer.echo(f"note: {hint}", err=True)
    _quantize(config, as_json, "bzq " + shlex.join(sys.argv[1:]))


def _quantize(config, as_json: bool, command: str) -> None:
    """Run the pipeline; print its result (one JSON object with --json); exit 3 when an optional step failed."""
    from ._files import STAGING
    from ._pipeline import run_pipeline

    try:
        result = run_pipeline(config, command)
    except KeyboardInterrupt:
        kept = len(list((config.out / STAGING).rglob("shard-*.safetensors")))
        raise BzqInterrupted(
            f"interrupted: '{config.out}' is unchanged; {kept} finished synthesis batches are kept in "
            f"'{config.out / STAGING}'; rerun the same command to resume."
        ) from None
    if as_json:
        print(json.dumps(result))
    else:
        c = result["calibration"]
        print(
            f"{config.model} {config.backend} W{config.w_bits}A{config.a_bits}, calibrated on {c['source']} "
            f"({c['images']} images, seed {c['seed']}) -> {config.out}"
        )
        for key in ("float", "quantized"):
            if key in result:
                r = result[key]
                extra = f"  agreement {r['agreement']:.2f}%  KL {r['kl']:.4f}" if "agreement" in r else ""
                extra += f"  [{r['runtime']}]" if "runtime" in r else ""
                print(f"  {key:>9}: top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  (n={r['n']}){extra}")
        parity = result["report"].get("onnx_parity")
        if parity and parity.get("passed"):
            print(
                f"  model.onnx: matches in {parity['runtime']} on {parity['images']} calibration images "
                f"(max |diff| {parity['max_abs_diff']} logits)"
            )
        for note in result["report"].get("notes", []):
            print(f"  note: {note}")
    if result["failed_steps"]:
        raise BzqPartial(
            f"{'; '.join(result['failed_steps'])} (the model and results.json were written to '{config.out}')"
        )


@app.command()
def push(
    folder: Annotated[Path, typer.Argument(help="A folder written by `bzq quantize`.")],
    repo_id: Annotated[str, typer.Option("--repo-id", help="USER/NAME on the Hugging Face Hub.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Write the exact upload folder (FOLDER.hub) and print its tree.")
    ] = False,
    allow_unchecked_onnx: Annotated[
        bool,
        typer.Option(
            "--allow-unchecked-onnx",
            help="Publish a model.onnx whose parity check failed or never ran (the card says so).",
        ),
    ] = False,
) -> None:
    """Publish a quantized model to the Hugging Face Hub with a generated model card (token: HF_TOKEN or login)."""
    from ._hub import push_to_hub

    if "/" not in repo_id or repo_id.count("/") != 1:
        raise BzqError(f"--repo-id must be USER/NAME, not '{repo_id}'.")
    where = push_to_hub(folder, repo_id, private=private, dry_run=dry_run, allow_unchecked_onnx=allow_unchecked_onnx)
    if dry_run:
        print(f"would upload to {repo_id} (dry run, nothing sent): {where}")
        for path in sorted(Path(where).rglob("*")):
            if path.is_file():
                print(f"  {path.relative_to(where)}  ({path.stat().st_size:,} bytes)")
    else:
        print(f"published {folder} to {repo_id}: {where}")


@recipe_app.command("list")
def recipe_list(as_json: JsonOpt = False) -> None:
    """List the recipes (recipes/ of a checkout, $BZQ_RECIPES, or the installed copy) and their measured accuracy."""
    from ._recipes import list_recipes, load_recipe

    rows = []
    for path in list_recipes():
        config, info = load_recipe(path)
        rows.append(
            {
                "name": path.stem,
                "model": config.model,
                "scheme": f"{config.backend} W{config.w_bits}A{config.a_bits}",
                "calib": config.calib,
                "expected_top1": info.get("expected_top1"),
                "expected_float_top1": info.get("expected_float_top1"),
                "file": str(path),
            }
        )
    if as_json:
        print(json.dumps(rows))
        return
    for r in rows:
        measured = (
            f"top-1 {r['expected_top1']:.1f} (float {r['expected_float_top1']:.1f})"
            if r["expected_top1"] is not None
            else "not measured yet"
        )
        print(f"{r['name']:<36} {r['model']:<24} {r['scheme']:<16} {measured}")


@recipe_app.command("run")
def recipe_run(
    recipe: Annotated[str, typer.Argument(help="A recipe name (see `bzq recipe list`) or a YAML file.")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a recipe key: --set images=256 (repeatable).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default: the recipe's name).")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate and build the model without weights; quantize nothing.")
    ] = False,
) -> None:
    """Run a recipe: `bzq quantize` with the recipe's options (validated before any work starts)."""
    from ._recipes import find_recipe, load_recipe

    path = find_recipe(recipe)
    overrides = list(set_ or []) + ([f"out={out}"] if out is not None else [])
    config, info = load_recipe(path, overrides)
    named = str(path) if Path(recipe).is_file() else path.stem  # as given: a file path, or a listed name
    command = "bzq recipe run " + shlex.join([named, *sum((["--set", s] for s in overrides), [])])
    if dry_run:
        from .models import load_model

        net, data_config = load_model(config.model, pretrained=False)
        params = sum(p.numel() for p in net.parameters())
        print(
            f"{path.stem}: valid; {config.model} builds ({params / 1e6:.2f} M parameters, input "
            f"{tuple(data_config['input_size'])}); would run: {command}"
        )
        return
    _quantize(config, False, command)
    if info.get("expected_top1") is not None:
        print(f"  recipe expects top-1 {info['expected_top1']:.2f} on {info.get('expected_on', '?')}")


@bench_app.command("synthesis")
def bench_synthesis(
    model: ModelArg,
    checkpoint: CheckpointOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 128,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Steps per timing.")] = 10,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Interleaved timings; medians are reported.")] = 3,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="torch CPU threads.")] = None,
    pretrained: Annotated[bool, typer.Option(help="Load pretrained weights (timing does not need them).")] = True,
    peer: Annotated[
        bool, typer.Option("--peer", help="Also time Sony MCT's generator step on the same batch (bench extra).")
    ] = False,
    low_res: LowResOpt = _SYN.low_res,
    precision: PrecisionOpt = _SYN.precision,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Time one synthesis step (full and half size) against a bare forward+backward of the same model and batch."""
    import torch

    from .bench import benchmark_synthesis
    from .models import load_model

    if threads:
        torch.set_num_threads(threads)
    net, data_config = load_model(model, checkpoint=checkpoint, pretrained=pretrained)
    result = benchmark_synthesis(
        net,
        data_config,
        batch_size=batch_size,
        steps=steps,
        repeats=repeats,
        device=device,
        peer=peer,
        low_res=low_res,
        precision=precision,
    )
    _emit(result, as_json, f"synthesis benchmark for {model}")


@bench_app.command("latency")
def bench_latency_cmd(
    folder: Annotated[Path, typer.Argument(help="A folder written by `bzq quantize`.")],
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Interleaved timings; medians are reported.")] = 10,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="CPU threads (torch and onnxruntime).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Float against quantized latency in the runtime the model deploys to (compiled PyTorch; onnxruntime), and the
    file sizes: one run, ratios."""
    from .bench import bench_latency

    result = bench_latency(folder, batch_size=batch_size, repeats=repeats, threads=threads)
    if as_json:
        print(json.dumps(result))
        return
    print(f"{result['model']} {result['backend']} {result['scheme']}, batch {batch_size}, {result['machine']['cpu']}")
    for row in result["rows"]:
        print(
            f"  {row['runtime']:<38} float {row['float_ms']:9.1f} ms  quantized {row['quantized_ms']:9.1f} ms  "
            f"speed-up {row['speedup']:.2f}x"
        )
    if result["sizes"]:
        s = result["sizes"]
        print(
            f"  {s['file']}: {s['quantized_bytes']:,} bytes, {100 * s['ratio']:.1f} % of float ({s['float_bytes']:,})"
        )
    for note in result["notes"]:
        print(f"  note: {note}")


@bench_app.command("zoo")
def bench_zoo_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder for models/NAME.json, zoo.json, zoo.md (resumable).")],
    model: Annotated[
        list[str] | None, typer.Option("--model", help="timm name, or NAME@SIDE for the input size (default: the zoo).")
    ] = None,
    timeout: Annotated[int, typer.Option("--timeout", min=10, help="Seconds per model.")] = 300,
) -> None:
    """Which timm architectures pass synthesis, Brevitas W8A8/W4A4 (+ ONNX parity), PT2E W8A8 (not a test)."""
    from .bench._zoo import ZooBenchConfig, bench_zoo

    config = ZooBenchConfig(timeout_s=timeout, **({"models": model} if model else {}))
    bench_zoo(config, out)
    print((out / "zoo.md").read_text())


@bench_app.command("quality")
def bench_quality_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder for sets, per-cell JSON, results.json/.md (resumable).")],
    task: Annotated[
        list[str] | None, typer.Option("--task", help="cifar_resnet20, cifar_resnet32, tf_efficientnet_lite0...")
    ] = None,
    scheme: Annotated[
        list[str] | None, typer.Option("--scheme", help="brevitas-w4a4, pt2e-w8a8, brevitas-w4a4[gptq=false]...")
    ] = None,
    source: Annotated[
        list[str] | None, typer.Option("--source", help="real, gaussian, zeroq, gznq, mct, gznq[bn_loss=l2]...")
    ] = None,
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds.")] = "0,1,2",
    images: Annotated[int, typer.Option("--images", min=1, help="Calibration images per set.")] = 128,
    iterations: Annotated[
        int | None, typer.Option("--iterations", min=0, help="Synthesis steps for gznq/zeroq (default: theirs).")
    ] = None,
    eval_limit: Annotated[int | None, typer.Option("--eval-limit", min=1, help="Evaluate the first N only.")] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="torch CPU threads.")] = None,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write PNG plots and picture grids.")] = True,
    keep_models: Annotated[
        bool,
        typer.Option(
            "--keep-models",
            help="Save each cell's quantized model beside its JSON (for `bzq eval`, and for the same model's other "
            "task: its data-free cells then evaluate the kept model instead of quantizing again).",
        ),
    ] = False,
    device: DeviceOpt = "auto",
) -> None:
    """Quantized top-1 on held-out real images per calibration source, under the same quantizer (not a test)."""
    import torch

    from .bench import QualityBenchConfig, bench_quality

    if threads:
        torch.set_num_threads(threads)
    defaults = QualityBenchConfig()
    config = QualityBenchConfig(
        tasks=task or defaults.tasks,
        schemes=scheme or defaults.schemes,
        sources=source or defaults.sources,
        seeds=[int(s) for s in seeds.split(",") if s.strip()],
        images=images,
        synthesis={"iterations": iterations} if iterations is not None else {},
        eval_limit=eval_limit,
        device=device,
        keep_models=keep_models,
    )
    results = bench_quality(config, out)
    if plots:
        from .bench._plots import write_plots

        write_plots(results, out)
    print((out / "results.md").read_text())


def main() -> None:
    """Entry point: run the app; report errors as one line (tracebacks only with --debug); exit codes as in
    docs/promises.md. With --json an error is one JSON object on stdout too."""
    try:
        app()
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except BzqPartial as e:  # the result (with its failed steps) is already on stdout
        print(f"bzq: error: {_one_line(str(e))}", file=sys.stderr)
        sys.exit(e.exit_code)
    except BzqError as e:
        if _debug:
            raise
        _fail(_one_line(str(e)), e.exit_code)
    except Exception as e:
        if _debug:
            raise
        _fail(f"{type(e).__name__}: {_one_line(str(e))} (run with --debug for the traceback)", 1)


def _one_line(message: str) -> str:
    """The line that says what went wrong; for an error raised in a DataLoader worker, its original message."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    if "Original Traceback" in message:
        last = lines[-1]
        return last.split("Error: ", 1)[1] if "Error: " in last else last
    return lines[0]


def _fail(message: str, code: int) -> None:
    if "--json" in sys.argv[1:]:
        print(json.dumps({"error": message, "exit_code": code}))
    print(f"bzq: error: {message}", file=sys.stderr)
    sys.exit(code)
