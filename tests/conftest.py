import os

# Before huggingface_hub or timm is imported: a hub miss must fail at once, not retry for ~50 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import logging  # noqa: E402
import tarfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

_DEFAULT_SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "benchmarks"
SHARED = Path(os.environ.get("BZQ_SHARED_BENCHMARKS", _DEFAULT_SHARED))

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _no_handler_on_a_closed_stream():
    """The CLI's root log handler writes to the stream it found; under typer's CliRunner that stream closes after
    the command, and every later log record printed a 'Logging error' traceback."""
    yield
    for handler in [h for h in logging.root.handlers if type(h) is logging.StreamHandler]:
        logging.root.removeHandler(handler)


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (real weights and images from ../shared/benchmarks; absent on this machine)")
    return path


@pytest.fixture(scope="session")
def shared() -> Path:
    return _need(SHARED.resolve())


@pytest.fixture(scope="session")
def resnet20_weights(shared) -> Path:
    return _need(shared / "cifar10" / "resnet20-12fca82f.th")


def _extract(shared: Path, rel: str, tmp_path_factory) -> Path:
    archive = _need(shared / rel)
    out = tmp_path_factory.mktemp(archive.stem)
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    return out / archive.stem


@pytest.fixture(scope="session")
def cifar_test_dev(shared, tmp_path_factory) -> Path:
    return _extract(shared, "cifar10/cifar10-test-dev.tar", tmp_path_factory)


@pytest.fixture(scope="session")
def cifar_train_calib(shared, tmp_path_factory) -> Path:
    return _extract(shared, "cifar10/cifar10-train-calib.tar", tmp_path_factory)


@pytest.fixture(scope="session")
def imagenet_sample(shared, tmp_path_factory) -> Path:
    return _extract(shared, "imagenet/imagenet-sample-even.tar", tmp_path_factory)


@pytest.fixture(scope="session")
def resnet20(resnet20_weights):
    from brevitas_zeroshot import load_model

    return load_model("cifar_resnet20", checkpoint=resnet20_weights)


def random_r20():
    """cifar_resnet20 without pretrained weights but with non-trivial BN statistics (for tests that need no data)."""
    from brevitas_zeroshot import load_model

    model, cfg = load_model("cifar_resnet20", pretrained=False)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model, cfg


def have_cxx() -> bool:
    """Whether a C++ compiler is on PATH (Inductor needs one to compile a program on the CPU)."""
    import shutil

    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


@pytest.fixture(params=["cpu_kernels", "torch_ops"])
def cpu_kernels(request, monkeypatch):
    """Our compiled CPU kernels (BN statistics, fake quantization), then the torch ops they replace where they cannot
    be built."""
    from torch.utils.cpp_extension import is_ninja_available

    from brevitas_zeroshot.quant import _lsq_cpu
    from brevitas_zeroshot.synth import _bn_cpu

    caches = (_bn_cpu.kernels, _lsq_cpu.kernels)
    for cache in caches:
        cache.cache_clear()
    if request.param == "torch_ops":
        monkeypatch.setenv("BZQ_NO_CPU_KERNELS", "1")
    elif not have_cxx() or not is_ninja_available():
        pytest.skip("no C++ compiler or no ninja on this machine: the kernels cannot be built (torch ops are used)")
    yield request.param
    for cache in caches:
        cache.cache_clear()
