"""PT2E backend (torch.export + torchao.quantization.pt2e): any Quantizer, X86InductorQuantizer by default."""

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._errors import BzqError, first_line
from .._files import write_atomic
from .._utils import has_int8_dot_product, progress
from ._registry import as_batches, register_backend

__all__ = ["PT2EConfig", "compile_program", "int8_layers", "quantize_pt2e", "default_quantizer"]

_logger = logging.getLogger(__name__)


@dataclass
class PT2EConfig:
    """A PT2E scheme. ``quantizer`` is any ``torchao.quantization.pt2e.quantizer.Quantizer``; by default
    XNNPACK's when ExecuTorch is installed and ``target="xnnpack"``, else X86 Inductor (8-bit static, per-channel
    weights).

    ``reduce_range`` (x86 only) keeps activations in 0..127: x86 CPUs without VNNI saturate the int8 kernels on the
    full 0..255 range (torchao's advice). None: decided by the CPU this runs on (on where it has no VNNI); set False
    for a program that will only run on VNNI CPUs, True for one that may run on older ones.
    """

    w_bits: int = 8
    a_bits: int = 8
    quantizer: Any = None
    target: str = "x86"  # "x86" (Inductor) or "xnnpack" (ExecuTorch)
    reduce_range: bool | None = None
    calib_batch_size: int = 32
    notes: list = field(default_factory=list)

    def __post_init__(self) -> None:
        from torchao.quantization.pt2e.quantizer import Quantizer

        if self.quantizer is not None and not isinstance(self.quantizer, Quantizer):
            raise BzqError(
                "quantizer must be a torchao.quantization.pt2e.quantizer.Quantizer, "
                f"not {type(self.quantizer).__name__}."
            )
        if self.quantizer is None and (self.w_bits, self.a_bits) != (8, 8):
            raise BzqError(
                f"the default PT2E quantizers are 8-bit only (asked W{self.w_bits}A{self.a_bits}); use the Brevitas "
                "backend for other bit widths, or pass your own Quantizer."
            )
        if self.target not in ("x86", "xnnpack"):
            raise BzqError("target must be 'x86' or 'xnnpack'.")


def default_quantizer(target: str = "x86", reduce_range: bool | None = None):
    """X86InductorQuantizer (static, per-channel weights; 7-bit activation range where ``reduce_range``, by default
    on CPUs without VNNI; also the convolutions it does not recognise), or ExecuTorch's XNNPACKQuantizer for
    ``xnnpack``."""
    if target == "xnnpack":
        try:
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer,
                get_symmetric_quantization_config,
            )
        except ImportError as e:
            raise BzqError("target 'xnnpack' needs ExecuTorch: pip install executorch.") from e
        return XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        get_default_x86_inductor_quantization_config,
    )

    if reduce_range is None:
        reduce_range = not has_int8_dot_product()
    return _x86_quantizer().set_global(get_default_x86_inductor_quantization_config(reduce_range=reduce_range))


def _x86_quantizer():
    """X86InductorQuantizer that also quantizes the convolutions it does not recognise.

    It finds convolutions by the module type that called them (``nn.Conv2d``, ``F.conv2d``), so a subclass with a
    forward of its own stays float: timm's ``Conv2dSame`` (TF "same" padding: the stem and every stride-2
    depthwise convolution of the TF ports, ``tf_efficientnet*``, ``tf_mixnet*``). Every other ``aten.conv2d`` with
    a parameter weight is annotated here as X86InductorQuantizer annotates a plain convolution."""
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    class X86InductorQuantizer(x86.X86InductorQuantizer):  # the name errors and reports show
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            model = super().annotate(model)
            if self.global_config is None:
                return model
            for node in model.graph.nodes:
                if (
                    node.target is torch.ops.aten.conv2d.default
                    and x86.QUANT_ANNOTATION_KEY not in node.meta
                    and node.args[1].op == "get_attr"
                ):
                    self._annotate_conv_node_helper(node, True, self.global_config)
            return model

    return X86InductorQuantizer()


def export_program(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch dimension; a model it cannot capture gets one clear error."""
    try:
        return torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    except Exception as e:
        first = first_line(e, 300, type(e).__name__)
        raise BzqError(
            f"torch.export cannot capture {type(model).__name__}: {type(e).__name__}: {first}. "
            "Try the Brevitas backend (--backend brevitas)."
        ) from e


@torch.no_grad()
def quantize_pt2e(float_model: nn.Module, calibration, config: PT2EConfig | None = None) -> tuple[nn.Module, dict]:
    """Export a copy of the float model, prepare it with the quantizer, calibrate on ``calibration``, convert."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    config = config or PT2EConfig()
    batches = as_batches(calibration, config.calib_batch_size)
    reduce_range = not has_int8_dot_product() if config.reduce_range is None else config.reduce_range
    quantizer = config.quantizer or default_quantizer(config.target, reduce_range)
    model = copy.deepcopy(float_model).eval()
    device = next(model.parameters()).device
    program = export_program(model, batches.example(2).to(device))
    try:
        prepared = prepare_pt2e(program.module(), quantizer)
    except Exception as e:  # e.g. X86InductorQuantizer on HRNet: "Input partition has more than one output node"
        first = first_line(e)
        raise BzqError(
            f"{type(quantizer).__name__} cannot annotate {type(float_model).__name__} ({type(e).__name__}: {first}); "
            "use the Brevitas backend (--backend brevitas), or pass a Quantizer of your own."
        ) from e
    for images in progress(batches, desc="calibration", unit="batch"):
        prepared(images.to(device))
    converted = convert_pt2e(prepared)
    allow_exported_model_train_eval(converted)  # so .eval() works as on any model
    report = {"graph": "pt2e", "quantizer": type(quantizer).__name__, "notes": list(config.notes)}
    if config.quantizer is None and config.target == "x86":
        report["activation_range"] = "0..127" if reduce_range else "0..255"
    return converted, report


def _without_unused_tensors(model: nn.Module) -> nn.Module:
    """A copy of a converted program without the float weights it no longer reads (convert_pt2e folds them into
    int8 constants but keeps the originals as attributes, and torch.export would save them all)."""
    model = copy.deepcopy(model)
    if isinstance(model, torch.fx.GraphModule):
        used = {node.target for node in model.graph.nodes if node.op == "get_attr"}
        for name, _ in [*model.named_parameters(), *model.named_buffers()]:
            if name not in used:
                owner, _, attr = name.rpartition(".")
                delattr(model.get_submodule(owner), attr)
    return model


def _save(qmodel: nn.Module, out: Path, example: torch.Tensor, report: dict, export_onnx: bool) -> dict:
    """``model.pt2``: the converted program (int8 weights only), exported again with a dynamic batch dimension."""
    # the file keeps its example input: two images, cloned (a view would save the whole batch behind it)
    program = export_program(_without_unused_tensors(qmodel), example[:2].clone())
    write_atomic(out / "model.pt2", lambda tmp: torch.export.save(program, str(tmp)))
    return {"program": "model.pt2"}


def _load(folder: Path, meta: dict) -> nn.Module:
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    model = torch.export.load(str(folder / meta["files"]["program"])).module()
    allow_exported_model_train_eval(model)
    return model


@torch.no_grad()
def compile_program(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, str]:
    """``model`` compiled by Inductor with frozen weights (so a PT2E program's quantize/dequantize pairs become the
    x86 int8 kernels X86InductorQuantizer targets), run once on ``example``; the eager model where that fails.

    Sets Inductor's process-wide ``freezing`` flag, as PyTorch's X86InductorQuantizer guide does (passed per call
    through ``torch.compile(options=...)`` it fails on the int8 weight prepacking in torch 2.14). Run the compiled
    model under ``torch.no_grad()``: inference mode fails there too. :func:`int8_layers` counts the layers that
    became int8 kernels.
    """
    import torch._inductor.config

    # Importing torchao's X86InductorQuantizer registers its int8 lowering passes with Inductor. A program loaded
    # in a fresh process (bzq eval, bench latency, a user's deployment) is otherwise compiled to float convolutions
    # between quantize/dequantize pairs: MobileNetV2 int8 ran 7x slower that way on a CPU with VNNI.
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401

    try:
        torch._inductor.config.freezing = True
        compiled = torch.compile(model)
        compiled(example)
        return compiled, "inductor"
    except Exception as e:  # no C++ compiler, an operator Inductor cannot lower...
        first = first_line(e)
        _logger.warning("torch.compile failed (%s: %s); running the eager program", type(e).__name__, first)
        return model, f"eager (torch.compile failed: {type(e).__name__}: {first})"


def int8_layers() -> int:
    """How many convolutions and linear layers Inductor has turned into x86 int8 kernels in this process so far."""
    from torch._dynamo.utils import counters

    return sum(n for k, n in counters["inductor"].items() if k.endswith("weight_prepack_matcher_count"))


register_backend(PT2EConfig, "pt2e", quantize=quantize_pt2e, save=_save, load=_load, lower=compile_program)
