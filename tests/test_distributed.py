import os
import signal
import subprocess
import sys
import time

import torch

from brevitas_zeroshot.synth import CalibrationSet

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def generate(weights, out, *extra, wait=True):
    cmd = [
        sys.executable,
        "-m",
        "brevitas_zeroshot",
        "generate",
        "cifar_resnet20",
        "--checkpoint",
        str(weights),
        "--out",
        str(out),
        "--images",
        "48",
        "--batch-size",
        "4",
        "--iterations",
        "25",
        "--low-res",  # the half-size steps too (their images are upsampled per rank at the switch)
        "0.4",
        "--jitter",  # and the augmentation (its draws are the batch's, the same on every rank)
        "0.1",
        "--flip",
        "--precision",  # not auto: where the CPU has native bf16, each run would time bf16 and could choose it
        "fp32",
        *extra,
    ]
    if wait:
        return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def test_two_gloo_ranks_make_the_single_process_set_and_resume_after_a_kill(resnet20_weights, tmp_path):
    single = generate(resnet20_weights, tmp_path / "single")
    assert single.returncode == 0, single.stderr
    reference = CalibrationSet.load(tmp_path / "single")
    assert (reference.meta["config"]["jitter"], reference.meta["config"]["flip"]) == (0.1, True)  # the flags arrive

    two = generate(resnet20_weights, tmp_path / "two", "--nproc", "2")
    assert two.returncode == 0, two.stderr
    got = CalibrationSet.load(tmp_path / "two")
    # each batch is split between the two ranks, whose statistics are summed: the same set to float tolerance
    # (Adam's normalised steps turn rounding differences in near-zero gradients into a few 1e-2 pixel differences)
    assert torch.equal(got.labels, reference.labels)
    assert (got.images - reference.images).abs().mean() < 2e-3
    final = lambda s: torch.tensor([b["bn_loss_final"] for b in s.meta["batches"]])  # noqa: E731
    assert torch.allclose(final(got), final(reference), rtol=1e-2)

    proc = generate(resnet20_weights, tmp_path / "killed", "--nproc", "2", wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((tmp_path / "killed").glob("shard-*.safetensors"))) < 2:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-way
    proc.wait()
    kept = sorted(p.name for p in (tmp_path / "killed").glob("shard-*.safetensors"))
    assert 2 <= len(kept) < 12, kept
    stamps = {name: (tmp_path / "killed" / name).stat().st_mtime_ns for name in kept}
    rerun = generate(resnet20_weights, tmp_path / "killed", "--nproc", "2")
    assert rerun.returncode == 0, rerun.stderr
    resumed = CalibrationSet.load(tmp_path / "killed")
    assert torch.equal(resumed.images, got.images) and torch.equal(resumed.labels, reference.labels)
    assert not list((tmp_path / "killed").glob("*.tmp*"))
    assert all((tmp_path / "killed" / name).stat().st_mtime_ns == t for name, t in stamps.items())  # not redone
