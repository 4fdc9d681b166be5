import copy
import csv
import shutil

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import normalize, to_tensor

from brevitas_zeroshot import BzqError, create_loader, evaluate


@pytest.fixture(scope="module")
def two_layouts(cifar_test_dev, tmp_path_factory):
    """The same 300 CIFAR images as an ImageFolder tree and as a flat folder with labels.csv."""
    tree, flat = tmp_path_factory.mktemp("tree"), tmp_path_factory.mktemp("flat")
    rows = []
    for label, cls in enumerate(sorted(p.name for p in cifar_test_dev.iterdir())):
        (tree / cls).mkdir()
        for img in sorted((cifar_test_dev / cls).iterdir())[:30]:
            shutil.copy(img, tree / cls / img.name)
            shutil.copy(img, flat / f"{cls}_{img.name}")
            rows.append((f"{cls}_{img.name}", label))
    with open(flat / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "class_index", "note"), *[(a, b, "x") for a, b in rows]])
    return tree, flat, rows


def test_both_layouts_match_a_hand_written_loop(resnet20, two_layouts):
    model, cfg = resnet20
    tree, flat, rows = two_layouts
    correct5 = correct1 = 0
    with torch.no_grad():
        for name, label in rows:
            x = normalize(to_tensor(Image.open(flat / name).convert("RGB")), cfg["mean"], cfg["std"])
            top = model(x[None])[0].topk(5).indices
            correct1 += int(top[0] == label)
            correct5 += int(label in top)
    expected = {"top1": 100 * correct1 / len(rows), "top5": 100 * correct5 / len(rows), "n": len(rows)}
    for folder in (tree, flat):
        got = evaluate(model, create_loader(folder, cfg, batch_size=64, workers=0))
        assert got["n"] == expected["n"]
        assert got["top1"] == pytest.approx(expected["top1"]) and got["top5"] == pytest.approx(expected["top5"])


def test_agreement_and_kl_against_reference(resnet20, two_layouts):
    model, cfg = resnet20
    loader = create_loader(two_layouts[0], cfg, batch_size=100, workers=0)
    same = evaluate(model, loader, reference=model)
    assert same["agreement"] == 100.0 and same["kl"] == pytest.approx(0.0, abs=1e-6)
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.linear.weight.add_(0.5 * torch.randn_like(perturbed.linear.weight))
    other = evaluate(perturbed, loader, reference=model)
    assert 0 < other["agreement"] < 100.0 and other["kl"] > 0


def test_folder_errors(tmp_path, resnet20):
    cfg = resnet20[1]
    with pytest.raises(BzqError, match="no images"):
        create_loader(tmp_path, cfg)
    with pytest.raises(BzqError, match="does not exist"):
        create_loader(tmp_path / "missing", cfg)
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text("file,class_index\na.png,3\nb.png,4\n")
    with pytest.raises(BzqError, match="names 1 files that are not in.*b.png"):
        create_loader(tmp_path, cfg)
    (tmp_path / "labels.csv").write_text("file,class_index\na.png,12\n")
    with pytest.raises(BzqError, match="model has 10 classes"):
        create_loader(tmp_path, cfg)


def test_tar_archive_of_a_folder_is_read_like_the_folder(resnet20, two_layouts, tmp_path, monkeypatch):
    import tarfile

    monkeypatch.setenv("BZQ_CACHE", str(tmp_path / "cache"))
    tree = two_layouts[0]
    with tarfile.open(tmp_path / "set.tar", "w") as tar:
        tar.add(tree, arcname="set")
    model, cfg = resnet20
    a = evaluate(model, create_loader(tree, cfg, workers=0))
    b = evaluate(model, create_loader(tmp_path / "set.tar", cfg, workers=0))
    c = evaluate(model, create_loader(tmp_path / "set.tar", cfg, workers=0))  # second time from the cache
    assert a == b == c
