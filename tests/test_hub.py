"""`bzq push` and `load_quantized("hf-hub:...")` against a local stand-in Hub (tests/hub_server.py)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_server import FakeHub

from brevitas_zeroshot._utils import has_int8_dot_product

TOKEN = "hf_bzqTestTokenThatMustNeverLeak"
REPO = "alice/resnet10t-w8a8-zeroshot"


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory) -> Path:
    """A real `bzq quantize` output folder: resnet10t (random weights from a file), PT2E W8A8, evaluated."""
    from PIL import Image

    from brevitas_zeroshot import load_model
    from brevitas_zeroshot._pipeline import PipelineConfig, run_pipeline

    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    net, _ = load_model("resnet10t", pretrained=False)
    torch.save(net.state_dict(), root / "resnet10t.pth")
    images = root / "images"
    images.mkdir()
    rows = ["file,class_index"]
    for i in range(4):
        Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy()).save(images / f"{i}.png")
        rows.append(f"{i}.png,{i}")
    (images / "labels.csv").write_text("\n".join(rows) + "\n")
    out = root / "out"
    config = PipelineConfig(
        model="resnet10t",
        out=out,
        backend="pt2e",
        calib="gznq",
        checkpoint=root / "resnet10t.pth",
        images=4,
        eval_data=images,
        device="cpu",
        synthesis={"iterations": 2, "batch_size": 4},
    )
    run_pipeline(config, command="bzq quantize resnet10t --backend pt2e --calib gznq --images 4")
    return out


def _bzq(args: list[str], hub_url: str, home: Path, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub_url, HF_HUB_OFFLINE="0", HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1")
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "brevitas_zeroshot", *args], capture_output=True, text=True, env=env, timeout=300
    )


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_model_card_metadata_parses_with_huggingface_hub(quantized_dir, tmp_path):
    from huggingface_hub import ModelCard

    from brevitas_zeroshot._hub import stage_upload

    files = stage_upload(quantized_dir, tmp_path / "stage", REPO)
    assert Path("README.md") in files and Path("calibration/manifest.json") in files
    assert not [f for f in files if f.suffix == ".safetensors" and f.parent.name == "calibration"]  # no images
    card = ModelCard.load(tmp_path / "stage" / "README.md")
    data = card.data
    assert data.base_model is None and "resnet10t.pth" in card.text  # the user's checkpoint is not timm's weights
    assert json.loads((tmp_path / "stage" / "quant_config.json").read_text())["checkpoint"] == "resnet10t.pth"
    assert data.pipeline_tag == "image-classification"
    assert {"zero-shot-quantization", "pt2e", "w8a8"} <= set(data.tags)
    result = data.eval_results[0]  # parsed back from model-index by huggingface_hub
    assert result.metric_type == "accuracy" and 0 <= result.metric_value <= 100
    assert "bzq quantize resnet10t" in card.text and 'load_quantized("hf-hub:' + REPO in card.text

    pretrained = tmp_path / "pretrained"  # the same folder as if timm's own weights had been quantized
    shutil.copytree(quantized_dir, pretrained)
    meta = json.loads((pretrained / "quant_config.json").read_text())
    (pretrained / "quant_config.json").write_text(json.dumps({**meta, "checkpoint": None}))
    stage_upload(pretrained, tmp_path / "stage2", REPO)
    data = ModelCard.load(tmp_path / "stage2" / "README.md").data
    assert data.base_model == "timm/resnet10t.c3_in1k" and data.base_model_relation == "quantized"

    from brevitas_zeroshot._hub import model_card

    low = tmp_path / "low"  # the card names the steps a 4-bit Brevitas model went through
    shutil.copytree(quantized_dir, low)
    meta = json.loads((low / "quant_config.json").read_text())
    meta["quantization"].update(
        backend="brevitas",
        w_bits=4,
        a_bits=4,
        first_last_bits=8,
        depthwise_bits=8,
        bias_correction=True,
        gptq_act_order=True,
    )
    meta["report"].update(
        reconstruction={"units": [], "seconds": 1.0}, residual_adds_in_float=9, weight_grid="asymmetric, mse steps"
    )
    (low / "quant_config.json").write_text(json.dumps(meta))
    assert (
        "brevitas, weights 4-bit, activations 4-bit, first/last layer 8-bit, depthwise convolutions 8-bit weights, "
        "asymmetric weights (zero points), GPTQ (act_order), block reconstruction, "
        "bias correction, residual adds not quantized" in model_card(low, REPO).content
    )
    meta["quantization"].update(bias_correction=None)  # today's default: the report says whether it ran
    for ran, named in ((True, "block reconstruction, bias correction, residual"), (False, "reconstruction, residual")):
        meta["report"].update(bias_correction=ran)
        (low / "quant_config.json").write_text(json.dumps(meta))
        assert named in model_card(low, REPO).content
    meta["quantization"].update(qronos=True)  # another solver: the card names it, and GPTQ no more
    (low / "quant_config.json").write_text(json.dumps(meta))
    card = model_card(low, REPO).content
    assert "(zero points), Qronos (act_order), block reconstruction" in card and "GPTQ" not in card
    meta["report"].update(weight_grid="symmetric, max steps", act_equalization=17)  # graph mode equalized 17 regions
    (low / "quant_config.json").write_text(json.dumps(meta))
    assert "8-bit weights, activation equalization (α 0.5), Qronos" in model_card(low, REPO).content


def test_push_and_reload_through_a_local_hub(quantized_dir, tmp_path):
    before = _snapshot(quantized_dir)
    with FakeHub(TOKEN) as hub:
        pushed = _bzq(["push", str(quantized_dir), "--repo-id", REPO, "--private"], hub.url, tmp_path / "hf")
        assert pushed.returncode == 0, pushed.stderr
        repo = hub.repos[REPO]
        assert repo["private"]
        assert {"README.md", "quant_config.json", "model.pt2", "calibration/manifest.json"} <= set(repo["files"])
        assert not [n for n in repo["files"] if n.startswith("calibration/shard-")]  # never the images
        writes = [r for r in hub.requests if r[0] == "POST" and "/commit/" in r[1]]
        assert writes and all(auth == f"Bearer {TOKEN}" for _, _, auth in writes)
        assert hub.validated_cards and "library_name: brevitas-zeroshot" in hub.validated_cards[0]
        leaked = [n for n, data in repo["files"].items() if TOKEN.encode() in data]
        assert not leaked and TOKEN not in pushed.stdout + pushed.stderr

        script = (
            "import sys, torch\n"
            "from brevitas_zeroshot.quant import load_quantized\n"
            f"hub, cfg = load_quantized('hf-hub:{REPO}')\n"
            "local, _ = load_quantized(sys.argv[1])\n"
            "x = torch.randn(2, *cfg['input_size'], generator=torch.Generator().manual_seed(0))\n"
            "print('maxdiff', (hub(x) - local(x)).abs().max().item())\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf2"), HF_TOKEN=TOKEN)
        reload = subprocess.run(
            [sys.executable, "-c", script, str(quantized_dir)], capture_output=True, text=True, env=env, timeout=300
        )
        assert reload.returncode == 0, reload.stderr
        assert "maxdiff 0.0" in reload.stdout
    assert _snapshot(quantized_dir) == before  # pushing changes nothing locally


def test_failed_upload_is_one_line_and_keeps_the_folder(quantized_dir, tmp_path):
    before = _snapshot(quantized_dir)
    with FakeHub(TOKEN, fail_commit=True) as hub:
        failed = _bzq(["push", str(quantized_dir), "--repo-id", REPO], hub.url, tmp_path / "hf")
    assert failed.returncode == 1
    lines = failed.stderr.strip().splitlines()
    assert lines[-1].startswith("bzq: error: upload to 'alice/resnet10t-w8a8-zeroshot' failed")
    assert "unchanged" in lines[-1] and TOKEN not in failed.stderr
    assert _snapshot(quantized_dir) == before


def test_unreachable_hub_and_bad_folder(quantized_dir, tmp_path):
    with FakeHub(TOKEN) as hub:
        url = hub.url  # closed when the block ends: nothing listens there any more
    down = _bzq(["push", str(quantized_dir), "--repo-id", REPO], url, tmp_path / "hf")
    assert down.returncode == 1 and "failed" in down.stderr.splitlines()[-1]
    not_model = _bzq(["push", str(tmp_path), "--repo-id", REPO], url, tmp_path / "hf")
    assert not_model.returncode == 1 and "is not a quantized model folder" in not_model.stderr


def test_dry_run_writes_the_exact_upload(quantized_dir, tmp_path):
    result = _bzq(["push", str(quantized_dir), "--repo-id", REPO, "--dry-run"], "http://127.0.0.1:9", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    stage = quantized_dir.with_name(quantized_dir.name + ".hub")
    assert (stage / "README.md").exists() and "README.md" in result.stdout and "model.pt2" in result.stdout


def test_push_refuses_an_onnx_file_that_failed_its_parity_check(tmp_path):
    from conftest import random_r20

    from brevitas_zeroshot._pipeline import PipelineConfig, run_pipeline

    model, _ = random_r20()
    torch.save(model.state_dict(), tmp_path / "r20.pth")
    out = tmp_path / "q"
    config = PipelineConfig(
        model="cifar_resnet20", out=out, calib="gaussian", checkpoint=tmp_path / "r20.pth", images=8
    )
    run_pipeline(config, command="bzq quantize cifar_resnet20 --calib gaussian")
    meta = json.loads((out / "quant_config.json").read_text())
    assert meta["report"]["onnx_parity"]["passed"]
    args = ["push", str(out), "--repo-id", REPO, "--dry-run"]
    checked = _bzq(args, "http://127.0.0.1:9", tmp_path / "hf")
    assert checked.returncode == 0, checked.stderr
    card = (tmp_path / "q.hub" / "README.md").read_text()
    stored = meta["report"]["onnx_weights"]  # int8 where this CPU has VNNI (the default), uint8 elsewhere
    assert stored == ("int8" if has_int8_dot_product() else "uint8")
    assert f"`model.onnx` (ONNX QCDQ; {stored} weights" in card and ") matches the quantized PyTorch model" in card

    meta["report"]["onnx_parity"].update(passed=False, agreement=40.0)  # as a failed check records it
    (out / "quant_config.json").write_text(json.dumps(meta))
    shutil.rmtree(tmp_path / "q.hub")
    refused = _bzq(args, "http://127.0.0.1:9", tmp_path / "hf")
    assert refused.returncode == 1 and "failed its parity check" in refused.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "q.hub").exists()
    forced = _bzq([*args, "--allow-unchecked-onnx"], "http://127.0.0.1:9", tmp_path / "hf")
    assert forced.returncode == 0, forced.stderr
    assert "**does not match**" in (tmp_path / "q.hub" / "README.md").read_text()
