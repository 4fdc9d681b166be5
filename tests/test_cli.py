import json
import os
import subprocess
import sys

import pytest

BZQ = [sys.executable, "-m", "brevitas_zeroshot"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*BZQ, *args], capture_output=True, text=True, env=ENV, timeout=600)


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
