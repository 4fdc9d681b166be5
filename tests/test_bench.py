"""`bzq bench quality`: the harness end to end on a tiny budget (it checks the harness, not the numbers)."""

import json
import os
from pathlib import Path

import pytest

from brevitas_zeroshot import BzqError
from brevitas_zeroshot.bench import QualityBenchConfig, bench_quality
from brevitas_zeroshot.bench._quality import make_scheme, parse_spec
from brevitas_zeroshot.bench._tasks import resolve_task


def test_specs_are_parsed_and_checked():
    assert parse_spec("gznq[bn_loss=l2, iterations=50,blur_sigma=0.5]") == (
        "gznq",
        {"bn_loss": "l2", "iterations": 50, "blur_sigma": 0.5},
    )
    assert parse_spec("real") == ("real", {})
    config = make_scheme("brevitas-w4a4[first_last_bits=null,gptq=false]")
    assert (config.w_bits, config.a_bits, config.first_last_bits, config.gptq) == (4, 4, None, False)
    for bad, message in [
        ("gznq[bn_loss]", "is not key=value"),
        ("tflite-w8a8", "unknown backend 'tflite'"),
        ("brevitas-w8", "unknown scheme"),
        ("brevitas-w4a4[colour=red]", "colour"),
        ("pt2e-w4a4", "8-bit only"),
    ]:
        with pytest.raises(BzqError, match=message):
            make_scheme(bad) if "-w" in bad else parse_spec(bad)


def test_task_splits_are_disjoint(shared):
    _, _, calib, held = resolve_task("tf_efficientnet_lite0")
    rows = lambda folder: [line.split(",") for line in (folder / "labels.csv").read_text().splitlines()[1:]]  # noqa: E731
    calib_classes = {int(c) for _, c in rows(calib)}
    held_classes = {int(c) for _, c in rows(held)}
    assert len(calib_classes) == len(held_classes) == 250 and not calib_classes & held_classes
    _, _, calib, held = resolve_task("cifar_resnet20:tune")
    targets = lambda folder: {os.path.realpath(folder / f) for f, _ in rows(folder)}  # noqa: E731
    assert len(targets(calib)) == len(targets(held)) == 500 and not targets(calib) & targets(held)
    with pytest.raises(BzqError, match="unknown benchmark task"):
        resolve_task("imagenet_everything")
    from brevitas_zeroshot.bench._tasks import BENCH_TASKS
    from brevitas_zeroshot.models import PACKAGED_WEIGHTS

    for model in PACKAGED_WEIGHTS:  # each offline ImageNet model has a held-out task and a tuning task
        assert BENCH_TASKS[model].split == "class-mod-4" and BENCH_TASKS[f"{model}:tune"].model == model


def test_quality_harness_end_to_end_and_resume(shared, tmp_path):
    try:
        import model_compression_toolkit  # noqa: F401

        peer = ["mct[n_iter=1]"]
    except ImportError:  # the optional peer (brevitas-zeroshot[bench]) is not installed: the harness runs without it
        peer = []
    config = QualityBenchConfig(
        tasks=["cifar_resnet20:tune"],
        schemes=["brevitas-w4a4[reconstruct_iters=3]", "pt2e-w8a8"],
        sources=["real", "gznq", *peer],
        seeds=[0, 1],
        images=8,
        synthesis={"iterations": 2, "batch_size": 8},
        eval_limit=50,
    )
    results = bench_quality(config, tmp_path)
    cells = results["cells"]
    assert len(cells) == 2 * len(config.sources) * 2
    assert {c["source"] for c in cells} == set(config.sources)
    assert all(c["n"] == 50 and 0 <= c["top1"] <= 100 and 0 <= c["agreement"] <= 100 for c in cells)
    assert all(c["synthesis_seconds"] > 0 for c in cells if c["source"] != "real")
    assert all(c["bn_loss_trace"] for c in cells if c["source"] == "gznq")
    # how the float model sees each set (one profile per set, the same in each scheme's cell)
    profiles = {(c["source"], c["seed"]): c["calibration_profile"] for c in cells}
    assert all(0 < p["confidence"] <= 1 and p["bn_loss"] > 0 and p["coverage"] > 0 for p in profiles.values())
    assert all(c["calibration_profile"] == profiles[c["source"], c["seed"]] for c in cells)
    # reconstruction's own wall time, beside synthesis's: issue 14 compares the two
    assert all(((c["reconstruction_seconds"] or 0) > 0) == c["scheme"].startswith("brevitas") for c in cells)
    units = [c["reconstruction_units"] for c in cells if c["scheme"].startswith("brevitas")]
    assert all(u and all(r["mse_after"] <= r["mse_before"] and 0 <= r["undecided"] <= 1 for r in u) for u in units)
    assert all(c["reconstruction_units"] is None for c in cells if c["scheme"].startswith("pt2e"))
    table = (tmp_path / "results.md").read_text()
    assert "| brevitas-w4a4[reconstruct_iters=3] | gznq | 2 |" in table and "±" in table
    table_rows = [line for line in table.splitlines() if line.startswith(("| pt2e", "| brevitas"))]
    assert "| set BN loss | confidence | coverage | synthesis s | reconstruction s |" in table
    assert all(r.endswith("| – |") == r.startswith("| pt2e") for r in table_rows)
    assert json.loads((tmp_path / "results.json").read_text())["float"]["cifar_resnet20:tune"]["n"] == 50

    from brevitas_zeroshot.bench._plots import write_plots

    written = write_plots(results, tmp_path)
    assert {p.name for p in written} == {
        "accuracy-cifar_resnet20_tune.png",
        "bn-loss-cifar_resnet20_tune.png",
        "grid-cifar_resnet20_tune.png",
    }
    assert all(p.stat().st_size > 1000 for p in written)

    # An interrupted run resumes: finished cells are kept as they are, a missing one is redone.
    files = sorted((tmp_path / "cells").rglob("seed*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    files[0].unlink()
    again = bench_quality(config, tmp_path)
    assert len(again["cells"]) == len(cells) and files[0].exists()
    assert all(p.stat().st_mtime_ns == stamps[p] for p in files[1:])

    # A run stopped while it writes the float cell leaves no part of one: the next run writes it whole.
    (float_cell,) = (tmp_path / "cells").glob("*/float.json")  # where the harness put it
    float_cell.unlink()

    def stopped_halfway(path, text, *args, **kwargs):
        with open(path, "w") as f:
            f.write(text[: len(text) // 2])
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "write_text", stopped_halfway)
        with pytest.raises(KeyboardInterrupt):
            bench_quality(config, tmp_path)
    assert not list(float_cell.parent.glob("*float.json*"))
    bench_quality(config, tmp_path)
    assert json.loads(float_cell.read_text())["n"] == 50

    # A cell made under other defaults (its spec resolved to other settings then) is redone, not reused.
    stale = next(p for p in files[1:] if "brevitas" in str(p))
    row = json.loads(stale.read_text())
    assert row["quant_config"]["reconstruct_iters"] == 3
    stale.write_text(json.dumps({**row, "quant_config": {**row["quant_config"], "reconstruct_iters": 300}}))
    bench_quality(config, tmp_path)
    assert json.loads(stale.read_text())["quant_config"]["reconstruct_iters"] == 3
    assert all(p.stat().st_mtime_ns == stamps[p] for p in files[1:] if p != stale)

    # A cell made before fields were added whose default keeps its behaviour (Qronos off, depthwise steps as the rest)
    # is kept; one that lacks a field whose default changed what runs (GPTQ's order) is redone.
    row = json.loads(stale.read_text())
    for missing, kept in ((("qronos", "depthwise_weight_range"), True), (("gptq_act_order",), False)):
        quant_config = {k: v for k, v in row["quant_config"].items() if k not in missing}
        stale.write_text(json.dumps({**row, "quant_config": quant_config}))
        bench_quality(config, tmp_path)
        assert (missing[0] not in json.loads(stale.read_text())["quant_config"]) == kept, missing  # redone: complete

    # A damaged cell (hand-edited, truncated) is refused in one line naming it, before any work, and left as it is.
    stale.write_text(stale.read_text()[:40])
    files[0].unlink()
    with pytest.raises(BzqError, match=f"'{stale}' is not a record bzq can read"):
        bench_quality(config, tmp_path)
    assert not files[0].exists() and len(stale.read_text()) == 40


@pytest.mark.parametrize("backend", ["pt2e", "brevitas"])
def test_latency_bench_times_the_deployed_runtime_and_sizes(backend, tmp_path):
    import subprocess
    import sys

    import torch
    from conftest import have_cxx, random_r20

    from brevitas_zeroshot._pipeline import PipelineConfig, run_pipeline

    model, _ = random_r20()
    torch.save(model.state_dict(), tmp_path / "r20.pth")
    out = tmp_path / backend
    config = PipelineConfig(
        model="cifar_resnet20", out=out, backend=backend, calib="gaussian", checkpoint=tmp_path / "r20.pth", images=8
    )
    run_pipeline(config)
    done = subprocess.run(
        [sys.executable, "-m", "brevitas_zeroshot", "bench", "latency", str(out), "--batch-size", "4", "--repeats", "2"]
        + ["--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    runtimes = [row["runtime"] for row in result["rows"]]
    deployed = "inductor (torch.compile)" if backend == "pt2e" else "onnxruntime (default optimisations)"
    if backend == "pt2e" and not have_cxx():  # Inductor cannot compile: the bench says so and times eager only
        assert runtimes == ["pytorch eager"] and result["notes"][0].startswith("not compiled")
    else:
        assert runtimes == ["pytorch eager", deployed]
    layers = sum(isinstance(m, torch.nn.Conv2d | torch.nn.Linear) for m in model.modules())
    if backend == "brevitas":  # onnxruntime fuses every conv and the classifier into integer kernels
        assert (result["rows"][1]["int8_layers"], result["rows"][1]["float_layers"]) == (layers, 0)
    elif have_cxx():  # in this fresh process every conv and linear layer is an int8 kernel
        assert result["rows"][1]["int8_layers"] == layers
    assert all(row["float_ms"] > 0 and row["quantized_ms"] > 0 for row in result["rows"])
    sizes = result["sizes"]
    assert sizes["file"] == ("model.pt2" if backend == "pt2e" else "model.onnx")
    # int8 weights on disk: the 0.27 M float32 weights of ResNet-20 take 1.1 MB, their int8 copies 0.27 MB
    assert sizes["quantized_bytes"] < 0.6 * sizes["float_bytes"]


def test_zoo_matrix_records_each_step_resumes_and_times_out(tmp_path):
    from brevitas_zeroshot.bench._zoo import ZooBenchConfig, bench_zoo

    out = tmp_path / "zoo"
    result = bench_zoo(ZooBenchConfig(models=["resnet10t@32"], timeout_s=300), out)
    steps = result["models"][0]["steps"]
    assert {k: v["status"] for k, v in steps.items()} == {
        "build": "pass",
        "synthesis": "pass",
        "brevitas_w8a8": "pass",
        "onnx": "pass",
        "brevitas_w4a4": "pass",
        "pt2e_w8a8": "pass",
    }
    assert steps["brevitas_w8a8"]["graph"] in ("fx", "layerwise") and steps["build"]["input"] == 32
    table = (out / "zoo.md").read_text()
    assert "| resnet10t |" in table and "1 of 1 BatchNorm architectures pass" in table
    stamp = (out / "models" / "resnet10t.json").stat().st_mtime_ns
    short = bench_zoo(ZooBenchConfig(models=["resnet10t@32", "resnet18@32"], timeout_s=10), out)
    assert (out / "models" / "resnet10t.json").stat().st_mtime_ns == stamp  # done models are not run again
    late = short["models"][1]["steps"]
    assert any(s["status"] == "timeout" and "10 s budget" in s["reason"] for s in late.values())


def test_synthesis_benchmark_times_the_half_and_full_size_steps_of_the_schedule():
    import timm

    from brevitas_zeroshot.bench import benchmark_synthesis
    from brevitas_zeroshot.synth import _bn_cpu
    from brevitas_zeroshot.synth._synthesiser import LOW_RES_DEFAULT

    net = timm.create_model("mobilenetv2_035", pretrained=False, num_classes=10).eval()
    cfg = {"input_size": (3, 128, 128), "mean": (0.5,) * 3, "std": (0.5,) * 3, "num_classes": 10}
    r = benchmark_synthesis(net, cfg, batch_size=8, steps=3, repeats=3, device="cpu")
    # auto: each size of the schedule decided on its own where the CPU has native bf16
    assert r["low_res"] == LOW_RES_DEFAULT and r["precision"] in (
        "fp32",
        "bf16",
        "bf16, fp32 at half size",
        "fp32, bf16 at half size",
    )
    assert r["bn_kernels"] == ("compiled" if _bn_cpu.kernels() is not None else "torch")  # which the times are of
    assert r["low_res_step_s"] > 0 and r["synthesis_step_s"] > 0  # how much cheaper depends on the model: results.md
    mixed = LOW_RES_DEFAULT * r["low_res_step_s"] + (1 - LOW_RES_DEFAULT) * r["synthesis_step_s"]
    assert r["set_cost_vs_fwd_bwd"] == pytest.approx(mixed / r["forward_backward_s"])
    assert r["images_per_s"] == pytest.approx(8 / (mixed * r["iterations"]))
    assert r["iterations"] == 100  # the default from 128 px
    assert r["set_cost_vs_200_fwd_bwd"] == pytest.approx(mixed * 100 / (200 * r["forward_backward_s"]))


def test_a_models_other_task_reuses_its_data_free_sets_and_kept_models(shared, tmp_path):
    """The held-out task of a model evaluates the tuning task's kept models of a data-free source (scored as if it
    had quantized again) and shares its set; real images, which differ between the tasks, are calibrated anew."""
    common = dict(
        schemes=["brevitas-w4a4[reconstruct_iters=3]"],
        sources=["gznq", "real"],
        seeds=[0],
        images=8,
        synthesis={"iterations": 2, "batch_size": 8},
        eval_limit=50,
    )
    tuned = bench_quality(QualityBenchConfig(tasks=["cifar_resnet20:tune"], keep_models=True, **common), tmp_path)
    kept = sorted(p.relative_to(tmp_path / "cells").as_posix() for p in (tmp_path / "cells").glob("*/*/*/*.model"))
    assert kept == [
        "cifar_resnet20_tune/brevitas-w4a4_reconstruct_iters=3/gznq/seed0.model",
        "cifar_resnet20_tune/brevitas-w4a4_reconstruct_iters=3/real/seed0.model",
    ]
    held = bench_quality(QualityBenchConfig(tasks=["cifar_resnet20"], **common), tmp_path)["cells"]
    cell = {(c["task"], c["source"]): c for c in held}
    reused = cell["cifar_resnet20", "gznq"]
    assert reused["model_from"] == "cifar_resnet20:tune" and "model_from" not in cell["cifar_resnet20", "real"]
    original = next(c for c in tuned["cells"] if c["source"] == "gznq")
    assert original["model_kept"] and not reused["model_kept"]
    assert reused["reconstruction_units"] == original["reconstruction_units"]
    assert not (tmp_path / "sets" / "cifar_resnet20" / "gznq").exists()  # the tuning task's set, not a new one
    assert (tmp_path / "sets" / "cifar_resnet20" / "real" / "seed0").is_dir()

    # the kept model is the one the tuning cell scored (reloaded exactly), and the held-out cell scores it
    from brevitas_zeroshot import create_loader, evaluate, load_model, load_quantized

    qmodel, data_config = load_quantized(tmp_path / "cells" / kept[0])
    net, _ = load_model("cifar_resnet20", checkpoint=resolve_task("cifar_resnet20")[1])
    for task, row in (("cifar_resnet20:tune", original), ("cifar_resnet20", reused)):
        loader = create_loader(resolve_task(task)[3], data_config, batch_size=50, limit=50)
        again = evaluate(qmodel, loader, reference=net.eval())
        assert [again[k] for k in ("top1", "agreement", "kl")] == [row[k] for k in ("top1", "agreement", "kl")], task

    # a model folder that an earlier run of the tuning cell left (the cell since redone without keeping) is not used
    tune_cell = tmp_path / "cells" / kept[0].replace(".model", ".json")
    tune_cell.write_text(json.dumps({**original, "model_kept": False}))
    held_cell = tmp_path / "cells" / kept[0].replace("cifar_resnet20_tune", "cifar_resnet20").replace(".model", ".json")
    held_cell.unlink()
    bench_quality(QualityBenchConfig(tasks=["cifar_resnet20"], **common), tmp_path)
    assert "model_from" not in json.loads(held_cell.read_text())
