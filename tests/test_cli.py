import json
import os
import subprocess
import sys

import pytest
from conftest import have_cxx

from brevitas_zeroshot.synth import CalibrationSet

BZQ = [sys.executable, "-m", "brevitas_zeroshot"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*BZQ, *args], capture_output=True, text=True, env=ENV, timeout=600)


def quantize_r20(weights, out, *args: str) -> subprocess.CompletedProcess:
    return run("quantize", "cifar_resnet20", "--checkpoint", str(weights), "--out", str(out), *args)


def test_help_lists_subcommands():
    out = run("--help")
    assert out.returncode == 0
    for cmd in ("generate", "quantize", "eval", "recipe", "push", "bench"):
        assert cmd in out.stdout


def test_eval_json_is_one_object_on_stdout(resnet20_weights, cifar_train_calib):
    out = run(
        "eval",
        "cifar_resnet20",
        "--checkpoint",
        str(resnet20_weights),
        "--data",
        str(cifar_train_calib),
        "--limit",
        "200",
        "--workers",
        "0",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["n"] == 200 and 0 <= result["top1"] <= result["top5"] <= 100


@pytest.mark.parametrize(
    "args,message",
    [
        (("eval", "not_a_model", "--data", "."), "timm has no model named 'not_a_model'"),
        (("eval", "cifar_resnet20", "--pretrained", "--data", "."), "No such option"),
        (("eval", "resnet18", "--data", "."), "could not get pretrained weights"),
        (("eval", "cifar_resnet20", "--checkpoint", "missing.pth", "--data", "."), "does not exist"),
    ],
)
def test_bad_input_is_one_line_without_traceback(args, message):
    out = run(*args)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_debug_shows_traceback():
    out = run("--debug", "eval", "not_a_model", "--data", ".")
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_generate_json_and_resume(resnet20_weights, tmp_path):
    args = (
        "generate",
        "cifar_resnet20",
        "--checkpoint",
        str(resnet20_weights),
        "--out",
        str(tmp_path / "set"),
        "--images",
        "16",
        "--batch-size",
        "8",
        "--iterations",
        "3",
        "--json",
    )
    first = run(*args)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["images"] == 16 and summary["bn_loss_final"] > 0
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == [
        "manifest.json",
        "preview.png",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    again = run(*args)  # complete: read back, not made again
    assert again.returncode == 0 and json.loads(again.stdout)["images"] == 16
    other = run(*args[:-1], "--seed", "7")
    assert other.returncode != 0 and "holds a different synthetic set" in other.stderr


def test_quantize_writes_results_and_eval_reads_the_folder(resnet20_weights, cifar_train_calib, tmp_path):
    out = tmp_path / "q"
    done = quantize_r20(
        resnet20_weights,
        out,
        "--backend",
        "brevitas",
        "--w-bits",
        "8",
        "--a-bits",
        "8",
        "--calib",
        "gaussian",
        "--images",
        "32",
        "--eval-data",
        str(cifar_train_calib),
        "--eval-limit",
        "100",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert json.loads((out / "results.json").read_text()) == result
    assert result["float"]["n"] == 100 and result["quantized"]["agreement"] > 80
    assert {"model.safetensors", "model.onnx", "quant_config.json", "calibration"} <= {p.name for p in out.iterdir()}
    ev = run("eval", str(out), "--data", str(cifar_train_calib), "--limit", "100", "--workers", "0", "--json")
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["top1"] == result["quantized"]["top1"]
    refused = quantize_r20(resnet20_weights, out, "--calib", "gaussian")
    assert refused.returncode != 0 and "already holds a quantized model" in refused.stderr


def test_quantize_flag_defaults_are_the_backend_configs_defaults():
    # the CLI module stays free of the quantization imports (torchao's import-time warnings, `bzq --help` speed),
    # so its flags repeat the configs' defaults: this keeps the two from drifting apart
    import inspect

    from brevitas_zeroshot.cli import quantize
    from brevitas_zeroshot.quant import BrevitasConfig, PT2EConfig
    from brevitas_zeroshot.quant._registry import quant_keys

    defaults = {**vars(PT2EConfig()), **vars(BrevitasConfig())}
    flags = {n: p.default for n, p in inspect.signature(quantize).parameters.items() if n in quant_keys()}
    assert len(flags) >= 10 and all(flags[n] == defaults[n] for n in flags), flags


@pytest.mark.parametrize(
    "args,message",
    [
        (("--backend", "brevitas", "--a-bits", "1"), "a_bits=1"),
        (("--backend", "pt2e", "--w-bits", "4"), "8-bit only"),
        (("--backend", "onnx"), "unknown backend"),
        (("--act-range", "max"), "act_range must be"),
        (("--set", "weight_range=huge"), "weight_range must be"),  # a setting without a flag reaches the config
        (("--set", "colour=red"), "expected KEY=VALUE with a quantization setting"),
        (("--set", "reconstruct_iters=many"), "'reconstruct_iters' must be int"),
        (("--low-res", "0.5", "--micro-batch", "-1"), "--micro-batch"),
        (("--jitter", "1.5"), "Invalid value for '--jitter'"),  # the flag exists and its range is checked
    ],
)
def test_impossible_quantize_options_fail_before_synthesis(tmp_path, args, message):
    out = run("quantize", "cifar_resnet20", "--out", str(tmp_path / "q"), *args)
    assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "q").exists()


def test_pt2e_quantize_and_eval_of_its_folder(resnet20_weights, cifar_train_calib, tmp_path):
    out = tmp_path / "p"
    done = quantize_r20(
        resnet20_weights,
        out,
        "--backend",
        "pt2e",
        "--calib",
        "gaussian",
        "--images",
        "16",
        "--eval-data",
        str(cifar_train_calib),
        "--eval-limit",
        "50",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    assert (out / "model.pt2").exists() and json.loads(done.stdout)["quantized"]["n"] == 50
    ev = run("eval", str(out), "--data", str(cifar_train_calib), "--limit", "50", "--workers", "0", "--json")
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["top1"] == json.loads(done.stdout)["quantized"]["top1"]
    # both evaluated the program as deployed: compiled by Inductor (int8 kernels), where a C++ compiler exists
    runtime = json.loads(done.stdout)["quantized"]["runtime"]
    assert runtime == json.loads(ev.stdout)["runtime"]
    assert runtime == "inductor" if have_cxx() else runtime.startswith("eager (torch.compile failed")


def test_quantize_resumes_its_synthesis_and_overwrite_replaces_a_different_one(resnet20_weights, tmp_path):
    out = tmp_path / "q"
    tiny = ("--backend", "pt2e", "--calib", "gznq", "--iterations", "2", "--batch-size", "8", "--no-onnx")
    first = quantize_r20(resnet20_weights, out, *tiny, "--images", "8")
    assert first.returncode == 0, first.stderr
    stamp = (out / "calibration" / "shard-00000.safetensors").stat().st_mtime_ns
    again = quantize_r20(resnet20_weights, out, *tiny, "--images", "8", "--overwrite")
    assert again.returncode == 0, again.stderr
    assert (out / "calibration" / "shard-00000.safetensors").stat().st_mtime_ns == stamp  # reused, not remade
    other = quantize_r20(resnet20_weights, out, *tiny, "--images", "16", "--overwrite")
    assert other.returncode == 0, other.stderr
    assert len(list((out / "calibration").glob("shard-*.safetensors"))) == 2
    assert len(CalibrationSet.load(out / "calibration")) == 16  # still a complete, reusable set
