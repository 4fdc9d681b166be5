"""What bzq promises (docs/promises.md): it deletes or replaces only what it wrote, checks every input before it
replaces anything, a failed step leaves the previous good state, errors are one line, exit codes as documented.

Each test reproduces one case of the fault pass (issue 12) on cifar_resnet20 with random weights and tiny budgets.
"""

import errno
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from conftest import random_r20
from PIL import Image

from brevitas_zeroshot import BzqError, load_model
from brevitas_zeroshot.synth import CalibrationSet, Synthesiser

BZQ = [sys.executable, "-m", "brevitas_zeroshot"]
TINY = ("--images", "8", "--batch-size", "8", "--iterations", "2")


def run(*args, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **kwargs.pop("env", {})}
    return subprocess.run([*BZQ, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout, **kwargs)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr, done.stderr
    assert lines and lines[-1].startswith("bzq: error: "), done.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """cifar_resnet20 with random weights and non-trivial BN statistics, as a checkpoint file."""
    model, _ = random_r20()
    path = tmp_path_factory.mktemp("ckpt") / "r20.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A labelled ImageFolder with all ten CIFAR classes, two images each."""
    root = tmp_path_factory.mktemp("images") / "cifar"
    g = torch.Generator().manual_seed(0)
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(2):
            pixels = (torch.rand(32, 32, 3, generator=g) * 255).byte().numpy()
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def quantized(ckpt, tmp_path_factory) -> Path:
    """A finished `bzq quantize` folder (Brevitas W8A8 on a synthesised set), the previous good state."""
    out = tmp_path_factory.mktemp("q") / "out"
    done = run("quantize", "cifar_resnet20", "--checkpoint", ckpt, "--out", out, *TINY, "--no-onnx")
    assert done.returncode == 0, done.stderr
    return out


def model_of(ckpt):
    return load_model("cifar_resnet20", checkpoint=ckpt)


# 1 -- generate --overwrite never deletes a folder it did not make, and replaces its own set only when complete


def test_generate_overwrite_keeps_a_foreign_folder(ckpt, tmp_path):
    app = tmp_path / "D"
    (app / "src").mkdir(parents=True)
    (app / "manifest.json").write_text('{"name": "app"}')
    (app / "src" / "app.py").write_text("x\n")
    before = snapshot(app)
    done = run("generate", "cifar_resnet20", "--checkpoint", ckpt, "--out", app, *TINY, "--overwrite")
    assert done.returncode == 1
    assert "was not written by bzq" in one_error_line(done) and "None" not in done.stderr
    assert snapshot(app) == before


def test_generate_overwrite_replaces_its_own_set_only_once_the_new_one_is_complete(ckpt, tmp_path, monkeypatch):
    net, cfg = model_of(ckpt)
    folder = tmp_path / "set"
    Synthesiser(net, cfg, "cpu", num_images=8, batch_size=4, iterations=1, seed=0).generate(folder)
    (folder / "notes.txt").write_text("mine")
    old = snapshot(folder)
    calls = []

    def interrupted(self, *args, **kwargs):  # Ctrl-C after the first batch of the replacement
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return original(self, *args, **kwargs)

    original = Synthesiser._synthesise_batches
    monkeypatch.setattr(Synthesiser, "_synthesise_batches", interrupted)
    new = Synthesiser(net, cfg, "cpu", num_images=8, batch_size=4, iterations=1, seed=5)
    with pytest.raises(KeyboardInterrupt):
        new.generate(folder, overwrite=True)
    assert {k: v for k, v in snapshot(folder).items() if not k.startswith(".bzq-partial")} == old
    assert CalibrationSet.load(folder).meta["seed"] == 0  # the previous set is still whole
    monkeypatch.setattr(Synthesiser, "_synthesise_batches", original)
    result = new.generate(folder, overwrite=True)  # resumes the replacement, then swaps it in
    assert result.meta["seed"] == 5 and len(result) == 8
    assert (folder / "notes.txt").read_text() == "mine" and not (folder / ".bzq-partial").exists()
    assert sorted(p.name for p in folder.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]


# 2, 3 -- quantize checks every input before it replaces anything, and never touches files it did not write


def test_quantize_refuses_files_it_did_not_write(ckpt, tmp_path):
    out = tmp_path / "c6b"
    out.mkdir()
    for name in ("model.safetensors", "model.onnx", "results.json"):
        (out / name).write_text(f"the user's {name}")
    before = snapshot(out)
    for extra in ((), ("--overwrite",), ("--calib", "/nonexistent")):
        done = run("quantize", "cifar_resnet20", "--checkpoint", ckpt, "--out", out, *TINY, *extra)
        assert done.returncode == 1 and "was not written by bzq" in one_error_line(done)
        assert snapshot(out) == before


def test_a_failed_overwrite_keeps_the_previous_model_and_set(ckpt, quantized):
    before = snapshot(quantized)
    for calib in ("/nonexistent", "gznqq"):
        done = run(
            "quantize", "cifar_resnet20", "--checkpoint", ckpt, "--out", quantized, "--calib", calib, "--overwrite"
        )
        assert done.returncode == 1 and "unknown calibration source" in one_error_line(done)
    bad_eval = run(
        "quantize", "cifar_resnet20", "--checkpoint", ckpt, "--out", quantized, *TINY, "--overwrite",
        "--eval-data", quantized / "missing",
    )  # fmt: skip
    assert bad_eval.returncode == 1 and "does not exist" in one_error_line(bad_eval)
    assert snapshot(quantized) == before


def test_calib_from_the_output_folder_is_read_not_deleted(ckpt, quantized, tmp_path):
    out = tmp_path / "again"
    copy = run("quantize", "cifar_resnet20", "--checkpoint", ckpt, "--out", out, *TINY, "--no-onnx")
    assert copy.returncode == 0, copy.stderr
    shards = snapshot(out / "calibration")
    done = run(
        "quantize", "cifar_resnet20", "--checkpoint", ckpt, "--out", out, "--calib", out / "calibration",
        "--overwrite", "--no-onnx", "--w-bits", "4", "--reconstruct-iters", "2", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert snapshot(out / "calibration") == shards
    assert json.loads((out / "quant_config.json").read_text())["quantization"]["w_bits"] == 4


def test_gaussian_does_not_replace_a_generated_set_without_overwrite(ckpt, tmp_path):
    out = tmp_path / "o"
    made = run("generate", "cifar_resnet20", "--checkpoint", ckpt, "--out", out / "calibration", *TINY)
    assert made.returncode == 0, made.stderr
    before = snapshot(out)
    done = run("quantize", "cifar_resnet20", "--checkpoint", ckpt, "--out", out, "--calib", "gaussian", "--images", "8")
    assert done.returncode == 1 and "holds another calibration set" in one_error_line(done)
    assert {k: v for k, v in snapshot(out).items() if ".bzq-partial" not in k} == before


# 4 -- a failed optional step is reported, and the model that is evaluated is the one that was saved


def test_failed_onnx_export_is_reported_and_does_not_corrupt_the_model(ckpt, images, tmp_path, monkeypatch, capsys):
    from brevitas_zeroshot import cli
    from brevitas_zeroshot.quant import load_quantized

    real_export = torch.onnx.export

    def disk_full(*args, **kwargs):  # inside Brevitas's export mode, as a full disk would fail
        real_export(*args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.onnx, "export", disk_full)
    out = tmp_path / "q"
    argv = ["bzq", "quantize", "cifar_resnet20", "--checkpoint", str(ckpt), "--out", str(out), *TINY]
    monkeypatch.setattr(sys, "argv", [*argv, "--calib", "gaussian", "--eval-data", str(images), "--json"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 3
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result == json.loads((out / "results.json").read_text())
    assert result["failed_steps"] and "No space left" in result["failed_steps"][0]
    assert "ONNX export" in captured.err.strip().splitlines()[-1]
    assert not (out / "model.onnx").exists() and not list(out.glob(".*tmp*"))
    from brevitas_zeroshot import create_loader, evaluate

    reloaded, data_config = load_quantized(out)
    net, _ = model_of(ckpt)
    again = evaluate(reloaded, create_loader(images, data_config, workers=0), reference=net)
    assert again["top1"] == result["quantized"]["top1"] and again["agreement"] == result["quantized"]["agreement"]
    assert again["kl"] == pytest.approx(result["quantized"]["kl"], rel=1e-4, abs=1e-9)


# 5, 6 -- real image folders: one line for an unreadable image, no silently wrong labels or archives


def test_unreadable_image_with_workers_is_one_line(ckpt, images, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for c in images.iterdir():
        (bad / c.name).symlink_to(c)
    (bad / "broken").mkdir()
    (bad / "broken" / "x.jpg").write_bytes(b"not a jpeg")
    (bad / "class9").unlink()  # keep ten classes: 'broken' replaces class9
    done = run("eval", "cifar_resnet20", "--checkpoint", ckpt, "--data", bad, "--workers", "2")
    assert done.returncode == 1
    line = one_error_line(done)
    assert "cannot read image" in line and "x.jpg" in line and len(done.stderr.strip().splitlines()) == 1


def test_imagefolder_with_missing_classes_is_refused(ckpt, images, tmp_path):
    three = tmp_path / "three"
    three.mkdir()
    for c in sorted(images.iterdir())[:3]:
        (three / c.name).symlink_to(c)
    done = run("eval", "cifar_resnet20", "--checkpoint", ckpt, "--data", three, "--workers", "0")
    assert done.returncode == 1 and "has 3 class folders but the model has 10 classes" in one_error_line(done)


def test_truncated_tar_is_refused_and_not_cached(images, tmp_path, monkeypatch):
    from brevitas_zeroshot.data import open_image_folder

    monkeypatch.setenv("BZQ_CACHE", str(tmp_path / "cache"))
    full = tmp_path / "full.tar"
    with tarfile.open(full, "w") as tar:
        tar.add(images, arcname="cifar")
    with tarfile.open(full) as tar:
        cut = tar.getmembers()[8].offset  # between two members: reads as a shorter, valid archive
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(full.read_bytes()[:cut])
    with pytest.raises(BzqError, match="damaged or truncated"):
        open_image_folder(truncated)
    assert not list((tmp_path / "cache" / "folders").glob("*/.complete"))
    assert len(list(open_image_folder(full).rglob("*.png"))) == 20


# 7 -- damaged BN statistics are named


def test_damaged_bn_statistics_name_the_layer(ckpt, caplog):
    from brevitas_zeroshot.synth import BNStatistics

    for bad in (-1.0, float("nan")):
        net, cfg = model_of(ckpt)
        net.layer2[1].bn1.running_var[3] = bad
        with pytest.raises(BzqError, match=r"'layer2.1.bn1' has damaged running statistics \(channel 3"):
            Synthesiser(net, cfg, "cpu", num_images=2, batch_size=2, iterations=1)
    net, cfg = model_of(ckpt)
    net.layer1[0].bn2.running_var[:2] = 0
    with caplog.at_level("WARNING"):
        Synthesiser(net, cfg, "cpu", num_images=2, batch_size=2, iterations=1)
    assert "layer1.0.bn2 (2)" in caplog.text
    stats = BNStatistics(net)
    dead = stats.channel_weight[stats.run_var <= stats.eps]
    assert dead.numel() == 2 and (dead == 0).all()


# 8, 9 -- push: the dry run never deletes a folder it did not stage; the card does not misattribute or leak paths


def test_push_dry_run_keeps_a_foreign_stage_and_the_card_tells_the_truth(quantized, ckpt):
    stage = quantized.with_name(quantized.name + ".hub")
    stage.mkdir()
    (stage / "mine.txt").write_text("the user's")
    refused = run("push", quantized, "--repo-id", "alice/r20", "--dry-run")
    assert refused.returncode == 1 and "bzq did not stage" in one_error_line(refused)
    assert (stage / "mine.txt").read_text() == "the user's"
    (stage / "mine.txt").unlink()
    stage.rmdir()
    for _ in range(2):  # the second run replaces its own stage
        done = run("push", quantized, "--repo-id", "alice/r20", "--dry-run")
        assert done.returncode == 0, done.stderr
    card = (stage / "README.md").read_text()
    assert "base_model:" not in card and "r20.pth" in card  # a local checkpoint is not timm's weights
    published = "".join(p.read_text(errors="replace") for p in stage.rglob("*") if p.suffix in (".md", ".json"))
    assert str(ckpt.parent) not in published and str(quantized.parent) not in published


# 10 -- the smaller ones


def test_recipe_yaml_errors_have_line_numbers(tmp_path):
    from brevitas_zeroshot._recipes import load_recipe

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: cifar_resnet20\nw_bits: [4\n")
    with pytest.raises(BzqError, match=r"bad.yaml:\d+: not valid YAML"):
        load_recipe(bad)
    twice = tmp_path / "twice.yaml"
    twice.write_text("model: cifar_resnet20\nw_bits: 4\nw_bits: 8\n")
    with pytest.raises(BzqError, match=r"twice.yaml:3: 'w_bits' is given twice \(first on line 2\)"):
        load_recipe(twice)


def test_recipe_dry_run_prints_a_command_that_works(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("model: cifar_resnet20\nbackend: pt2e\n")
    done = run("recipe", "run", recipe, "--dry-run")
    assert done.returncode == 0, done.stderr
    command = shlex.split(done.stdout.split("would run: ")[1])
    assert command[:3] == ["bzq", "recipe", "run"]
    again = run(*command[1:], "--dry-run")
    assert again.returncode == 0, again.stderr


def test_a_saved_set_reports_its_own_size_and_seed(ckpt, tmp_path):
    made = run("generate", "cifar_resnet20", "--checkpoint", ckpt, "--out", tmp_path / "s", "--images", "16",
               "--batch-size", "8", "--iterations", "1", "--seed", "3")  # fmt: skip
    assert made.returncode == 0, made.stderr
    done = run("quantize", "cifar_resnet20", "--checkpoint", ckpt, "--out", tmp_path / "q", "--calib",
               tmp_path / "s", "--images", "8", "--no-onnx", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["calibration"] | {"source": None} == {"source": None, "images": 16, "seed": 3}


def test_ctrl_c_in_quantize_says_what_it_kept(ckpt, tmp_path):
    out = tmp_path / "q"
    args = ["quantize", "cifar_resnet20", "--checkpoint", ckpt, "--out", out, "--images", "16", "--batch-size", "8"]
    # Batches long enough that the signal lands in the second one's synthesis (1500 steps: >= 15 s on an idle
    # machine, against a 0.2 s poll), with a generous wait for the first on a busy one.
    # SIGINT back to its default in the child: a suite started in the background inherits it ignored, and Python
    # then installs no KeyboardInterrupt handler (as a shell's background job should not see ctrl-c).
    proc = subprocess.Popen([*BZQ, *map(str, args), "--iterations", "1500"], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.time() + 600
    while not list((out / ".bzq-partial").rglob("shard-00000.safetensors")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    line = err.strip().splitlines()[-1]
    assert "interrupted" in line and "1 finished synthesis batches are kept" in line and "rerun" in line
    assert [p.name for p in out.iterdir()] == [".bzq-partial"]


def test_exit_codes_and_json_errors(ckpt, tmp_path):
    usage = run("quantize", "cifar_resnet20", "--out", tmp_path / "q", "--images", "0")
    assert usage.returncode == 2  # the command line itself is wrong (docs/promises.md)
    bad = run("quantize", "cifar_resnet20", "--checkpoint", ckpt, "--out", tmp_path / "q", "--calib", "nope", "--json")
    assert bad.returncode == 1
    assert json.loads(bad.stdout) == {"error": one_error_line(bad)[len("bzq: error: ") :], "exit_code": 1}


def test_sources_name_themselves_and_say_what_they_ignore(ckpt, tmp_path, caplog):
    from brevitas_zeroshot.synth._sources import create_calibration_set

    net, cfg = model_of(ckpt)
    zq = create_calibration_set("zeroq", net, cfg, 4, out=tmp_path / "z", device="cpu", iterations=1, batch_size=4)
    assert zq.meta["source"] == json.loads((tmp_path / "z" / "manifest.json").read_text())["source"] == "zeroq"
    with caplog.at_level("WARNING"):
        create_calibration_set("gaussian", net, cfg, 4, iterations=5, lr=0.5)
        create_calibration_set("zeroq", net, cfg, 4, device="cpu", iterations=1, bn_loss="kl_forward")
    assert "'gaussian' ignores the synthesis setting(s): iterations, lr" in caplog.text
    assert "'zeroq' ignores the synthesis setting(s): bn_loss" in caplog.text


def test_resumed_set_counts_all_its_synthesis_time_and_files_follow_the_umask(ckpt, tmp_path):
    net, cfg = model_of(ckpt)
    folder = tmp_path / "set"
    calib = Synthesiser(net, cfg, "cpu", num_images=8, batch_size=4, iterations=3)
    old = os.umask(0o022)
    try:
        first = calib.generate(folder)
        (folder / "shard-00001.safetensors").unlink()
        manifest = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
        resumed = Synthesiser(net, cfg, "cpu", num_images=8, batch_size=4, iterations=3).generate(folder)
    finally:
        os.umask(old)
    per_batch = [b["seconds"] for b in resumed.meta["batches"]]
    assert len(per_batch) == 2 and resumed.meta["synthesis_seconds"] == pytest.approx(sum(per_batch), abs=1e-3)
    assert first.meta["batches"][0]["seconds"] == per_batch[0]  # the kept batch keeps its time
    for path in folder.iterdir():
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_damaged_model_files_are_named(quantized, tmp_path):
    import shutil

    for name in ("model.safetensors", "quant_config.json"):
        copy = tmp_path / name
        shutil.copytree(quantized, copy)
        (copy / name).write_bytes((copy / name).read_bytes()[:100])
        done = run("eval", copy, "--data", tmp_path, "--workers", "0")
        assert done.returncode == 1 and str(copy / name) in one_error_line(done)


def test_progress_bars_stay_out_of_redirected_logs(ckpt, tmp_path):
    args = ("--images", "8", "--batch-size", "8", "--iterations", "60")  # long enough for tqdm to draw frames
    done = run("generate", "cifar_resnet20", "--checkpoint", ckpt, "--out", tmp_path / "s", *args)
    assert done.returncode == 0 and "\r" not in done.stderr


def test_two_processes_unpacking_one_archive_keep_the_first_copy(images, tmp_path, monkeypatch):
    from brevitas_zeroshot.data import _folder, open_image_folder

    monkeypatch.setenv("BZQ_CACHE", str(tmp_path / "cache"))
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(images, arcname="cifar")
    first = open_image_folder(archive)  # the other process's copy, in use
    (first.parent / ".complete").unlink()  # as seen before the other process finished: this one unpacks too
    real_check = _folder._check_end_marker

    def finished_meanwhile(*args):
        real_check(*args)
        (first.parent / ".complete").touch()  # ...and the other process completes first

    monkeypatch.setattr(_folder, "_check_end_marker", finished_meanwhile)
    marker = first / "class0" / "0.png"
    inode = marker.stat().st_ino
    again = open_image_folder(archive)
    assert again == first and marker.stat().st_ino == inode  # the copy in use was not replaced
    assert not list((tmp_path / "cache" / "folders").glob("*.tmp*"))
