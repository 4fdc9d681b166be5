"""Every recipe in recipes/ validates and builds its model; bad recipes fail before any work with key and line."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from brevitas_zeroshot import BzqError, load_model
from brevitas_zeroshot._pipeline import PipelineConfig
from brevitas_zeroshot._recipes import find_recipe, list_recipes, load_recipe, recipe_hint
from brevitas_zeroshot.cli import app

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_the_recipes_folder_is_found_and_listed():
    assert len(RECIPES) >= 7
    assert {p.stem for p in RECIPES} <= {p.stem for p in list_recipes()}
    result = CliRunner().invoke(app, ["recipe", "list", "--json"])
    assert result.exit_code == 0, result.output
    names = {row["name"] for row in json.loads(result.stdout)}
    assert {"cifar_resnet20-w4a4-brevitas", "mobilenetv2_100-w8a8-pt2e", "resnet50-w4a4-brevitas"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_dry_runs(path):
    config, info = load_recipe(path)
    assert config.model and info.get("description"), f"{path.name} needs a model and a description"
    assert path.stem.startswith(config.model) and f"w{config.w_bits}a{config.a_bits}" in path.stem
    assert config.backend in path.stem
    net, data_config = load_model(config.model, pretrained=False)
    assert sum(p.numel() for p in net.parameters()) > 0 and len(data_config["input_size"]) == 3
    if "expected_top1" in info:
        assert info["expected_top1"] <= info["expected_float_top1"] + 1 and info.get("expected_on")


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: resnet18\nbackend: brevitas\nw_bit: 4\n", "r.yaml:3: unknown key 'w_bit' (did you mean w_bits"),
        ("model: resnet18\nimages: many\n", "r.yaml:2: 'images' must be int, not 'many'"),
        ("model: resnet18\nbackend: brevitas\nw_bits: 1\n", "r.yaml:3: w_bits=1"),
        ("model: resnet18\nbackend: pt2e\nw_bits: 4\n", "8-bit only"),
        ("model: resnet18\nbackend: tflite\n", "unknown backend 'tflite'"),
        ("- model: resnet18\n", "a recipe is a flat YAML mapping"),
        ("model: [resnet18\n", "not valid YAML"),
        ("images: 64\n", "names no 'model'"),
    ],
)
def test_bad_recipes_name_the_key_and_line(tmp_path, text, message):
    with pytest.raises(BzqError, match=None) as err:
        load_recipe(_recipe(tmp_path, text))
    assert message in str(err.value)


def test_overrides_are_typed_and_validated(tmp_path):
    path = _recipe(tmp_path, "model: cifar_resnet20\nbackend: brevitas\nw_bits: 4\na_bits: 4\n")
    sets = ["images=16", "iterations=3", "eval-limit=10", "gptq=false", "weight_symmetric=false"]
    config, _ = load_recipe(path, sets)
    assert (config.images, config.synthesis["iterations"], config.eval_limit) == (16, 3, 10)
    backend = config.quant_config()  # quantization settings are the backend config's fields, flag or not
    assert (backend.w_bits, backend.gptq, backend.weight_symmetric) == (4, False, False)
    with pytest.raises(BzqError, match="--set reconstruct_iters=many: 'reconstruct_iters' must be int"):
        load_recipe(path, ["reconstruct_iters=many"])
    with pytest.raises(
        BzqError, match="--set reconstruct_iters=0: reconstruct_iters and reconstruct_batch must be at least 1"
    ):
        load_recipe(path, ["reconstruct_iters=0"])
    assert config.out == Path("r")  # default output folder: the recipe's name
    with pytest.raises(BzqError, match="--set a_bits=1"):
        load_recipe(path, ["a_bits=1"])
    with pytest.raises(BzqError, match="--set colour=red: unknown key 'colour'"):
        load_recipe(path, ["colour=red"])
    with pytest.raises(BzqError, match="no recipe 'nope'"):
        find_recipe("nope")


def test_quantize_points_to_the_tested_recipe_where_its_settings_differ(tmp_path, monkeypatch):
    # MobileNetV2 W4A8 on 64 images: its recipe's 128 differ
    fewer = PipelineConfig(model="mobilenetv2_100", out=tmp_path, w_bits=4, a_bits=8, images=64)
    hint = recipe_hint(fewer)
    assert "mobilenetv2_100-w4a8-brevitas" in hint and "measured top-1" in hint and "sets images=128:" in hint
    recipe, _ = load_recipe(find_recipe("mobilenetv2_100-w4a8-brevitas"))
    assert recipe_hint(recipe) is None  # the recipe itself, or a run with its settings
    other = {"model": "mobilenetv2_100", "out": tmp_path, "w_bits": 4, "images": 64}
    assert recipe_hint(PipelineConfig(**other, a_bits=8, calib="gaussian")) is None
    assert recipe_hint(PipelineConfig(**other, a_bits=4)) is None
    # EfficientNet-Lite0's W4A8 recipe is the library defaults: nothing to point to
    assert recipe_hint(PipelineConfig(model="tf_efficientnet_lite0", out=tmp_path, w_bits=4, a_bits=8)) is None
    # a setting the run leaves to the input size is no difference: the CIFAR recipe's 200 steps are the 32 px default
    assert recipe_hint(PipelineConfig(model="cifar_resnet20", out=tmp_path, w_bits=4, a_bits=4, images=256)) is None
    # ... and is compared once resolved: a recipe of the user's that sets other steps than the 32 px default
    mine = tmp_path / "mine"
    mine.mkdir()
    text = find_recipe("cifar_resnet20-w4a4-brevitas").read_text().replace("iterations: 200", "iterations: 300")
    (mine / "cifar_resnet20-w4a4-brevitas.yaml").write_text(text)
    monkeypatch.setenv("BZQ_RECIPES", str(mine))
    hint = recipe_hint(PipelineConfig(model="cifar_resnet20", out=tmp_path, w_bits=4, a_bits=4, images=256))
    assert "sets iterations=300:" in hint
    monkeypatch.delenv("BZQ_RECIPES")
    # the CLI says it on stderr before any work (here the run then stops: --out is a file)
    (tmp_path / "file").write_text("x")
    args = ["quantize", "mobilenetv2_100", "--out", str(tmp_path / "file"), "--w-bits", "4", "--images", "64", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and "note: the tested recipe mobilenetv2_100-w4a8-brevitas" in result.stderr
    assert "tested recipe" not in result.stdout


def test_recipe_run_quantizes_and_records_the_command(resnet20_weights, tmp_path):
    out = tmp_path / "run"
    args = ["recipe", "run", "cifar_resnet20-w8a8-pt2e", "--out", str(out)]
    args += ["--set", f"checkpoint={resnet20_weights}", "--set", "images=8", "--set", "iterations=2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["command"].startswith("bzq recipe run cifar_resnet20-w8a8-pt2e --set checkpoint=")
    assert saved["calibration"]["images"] == 8 and (out / "model.pt2").exists()


HUB_RECIPES = [p for p in RECIPES if not p.stem.startswith("cifar_")]


@pytest.mark.parametrize("path", HUB_RECIPES, ids=[p.stem for p in HUB_RECIPES])
def test_every_hub_weight_recipe_runs_end_to_end_on_random_weights(path, tmp_path):
    # the recipes name models whose weights come from the Hub: run each one whole, on random weights from a file,
    # at its own input size and settings, with the smallest budget (2 images, 1 synthesis step, 1 reconstruction step)
    import torch

    config, _ = load_recipe(path)
    net, _ = load_model(config.model, pretrained=False)
    torch.save(net.state_dict(), tmp_path / "random.pth")
    out = tmp_path / "out"
    sets = ["checkpoint=" + str(tmp_path / "random.pth"), "images=2", "iterations=1", "batch_size=2"]
    sets += ["reconstruct_iters=1", "gptq=false"] if config.backend == "brevitas" else []
    args = ["recipe", "run", path.stem, "--out", str(out)] + [a for s in sets for a in ("--set", s)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "quant_config.json").read_text())
    assert saved["model"] == config.model and saved["calibration"]["num_images"] == 2
    if config.backend == "brevitas":
        assert saved["report"]["onnx_parity"]["passed"], saved["report"]["onnx_parity"]
