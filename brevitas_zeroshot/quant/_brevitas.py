"""Brevitas backend: graph preprocessing with BN merge, quantization, calibration, GPTQ/GPFQ, bias correction.

Talks to Brevitas's core API (``brevitas.graph``), not to the example scripts shipped in its wheel.
"""

import collections
import contextlib
import copy
import functools
import logging
import operator
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import BzqError
from .._files import write_atomic
from .._utils import has_int8_dot_product, progress
from ._onnx import export_qcdq, onnx_parity
from ._reconstruct import ReconstructionConfig, reconstruct
from ._registry import as_batches, register_backend

__all__ = ["BrevitasConfig", "quantize_brevitas", "prepare_for_brevitas", "build_quant_model"]

_logger = logging.getLogger(__name__)


@dataclass
class BrevitasConfig:
    """A Brevitas PTQ scheme: integer weights (per-channel, symmetric) and per-tensor activations."""

    w_bits: int = 8
    a_bits: int = 8
    first_last_bits: int | None = 8  # None: the first and last layers get w_bits/a_bits too
    depthwise_bits: int | None = None  # weight bits of depthwise convolutions (None: w_bits)
    # Bits of the first layer's output activations, the second layer's input, where more than a_bits and
    # first_last_bits is set (graph mode; None: a_bits, QDrop's convention). 8: BRECQ's and Genie's convention;
    # MobileNetV2 W4A4 gained 2-8 pt on every seed with ours and real images, cifar_resnet20 lost 1 pt of top-1
    # while its KL to float fell by a third (docs/method.md).
    first_output_bits: int | None = 8
    # first_last_bits also reach the input quantizer Brevitas puts behind a padding layer (EfficientNet-Lite's
    # TensorFlow-SAME stem). False: models saved before, whose stem convolution took an a_bits input.
    edge_bits_through_pads: bool = True
    # The quantizer Brevitas puts behind a zero pad of a ReLU's output (EfficientNet-Lite's stride-2 depthwise
    # convolutions) is unsigned, as the values. False: models saved before, where it was signed (half its levels).
    unsigned_pads: bool = True
    weight_granularity: str = "per_channel"  # or "per_tensor"
    act_percentile: float = 99.999
    # How calibration sets activation ranges: "percentile" (act_percentile) or "mse" (Brevitas's error search);
    # None: mse with reconstruction, which learns the steps from there (better at W4A4; without it mse was worse,
    # docs/method.md), percentile otherwise.
    act_range: str | None = None
    # Weight steps from the largest magnitude ("max") or Brevitas's error search ("mse"), on a symmetric grid (zero
    # at its centre, narrow range) or an asymmetric one (per-channel zero point). None: asymmetric mse for 2-bit
    # weights, where the symmetric grid is ternary and max steps round most weights to 0 (W2A4 tuning split: 27.8
    # -> 52.6, docs/method.md); symmetric max otherwise (better at 3 and 4 bits).
    weight_range: str | None = None
    weight_symmetric: bool | None = None
    # Weight steps of the depthwise convolutions alone ("max" or "mse"; None: as weight_range). GPTQ cannot spread
    # a depthwise kernel's rounding error (9 weights per output channel), so a tighter step may serve them better.
    depthwise_weight_range: str | None = None
    equalize_iters: int = 20
    # SmoothQuant's alpha for Brevitas's activation equalization (graph mode; 0: off): each channel of a layer's
    # input is divided by (max|x|^alpha / max|w|^(1-alpha)), measured on the calibration set, and the layers that
    # write it and read it absorb the factor (exact in float). It moves outlier channels of the activations, such
    # as the massive ones in MobileNetV2's stage-5 residual stream, into the weights. None: 0.5 below 8-bit
    # activations (MobileNetV2 W4A4 tuning split, ours +10.4 pt, real images +10.0; cifar_resnet20 level;
    # docs/method.md), 0 otherwise.
    act_equalization: float | None = None
    gptq: bool | None = None  # None: on when w_bits < 8
    # GPTQ takes each layer's input channels in decreasing Hessian-diagonal order (Brevitas's act_order): tuning
    # splits, 3 seeds: MobileNetV2 W4A8 70.40 -> 73.33, cifar_resnet20 W4A4 79.20 -> 79.80 (docs/method.md).
    gptq_act_order: bool = True
    gpfq: bool = False
    # Qronos (Brevitas's GPFQ-family solver): each layer's rounding also corrects the error its quantized input
    # carries from the layers before it (GPTQ fits the quantized input only).
    qronos: bool = False
    # Bias correction after calibration and GPTQ. None: on unless reconstruction runs, which fits each block's output
    # itself: after it, per-layer bias correction undid part of that fit (MobileNetV2 W4A4 tuning split: -5 to -17
    # pt from the float start) and was level on the CIFAR ResNets (docs/method.md).
    bias_correction: bool | None = None
    calib_batch_size: int = 32
    graph: str = "auto"  # "fx" (graph mode, BN merged), "layerwise", or "auto" (fx, else layerwise)
    # Block reconstruction after GPTQ. None: on below 8-bit weights or activations (MobileNetV2 W4A8 tuning split,
    # seed 0: ours 71.6 -> 78.4, real images 74.8 -> 81.6, KL to float a third; docs/method.md).
    reconstruct: bool | None = None
    reconstruct_iters: int = ReconstructionConfig.iterations  # optimisation steps per block
    reconstruct_batch: int = ReconstructionConfig.batch_size  # images per step
    learn_act_scales: bool = True  # reconstruction also learns the activation step sizes (LSQ)
    learn_weight_scales: bool = False  # reconstruction also learns the weights' per-channel steps (as Genie)
    reconstruct_drop: float = 0.0  # QDrop: probability that an activation skips quantization while learning
    reconstruct_round_weight: float = ReconstructionConfig.round_weight  # AdaRound's regulariser weight
    # Reconstruction also learns on the calibration images' mirror images (twice the images, the same steps). Off:
    # level from the default start; with learn_gptq_rounding it lowered the KL to float (docs/method.md).
    reconstruct_flip: bool = False
    reconstruct_fisher: bool = False  # weigh each block's output error by the float network's Fisher (BRECQ)
    # > 0: reconstruction learns on random windows of this fraction of each unit's output side (computed exactly,
    # about the window's area per step); 0: on whole images.
    reconstruct_crop: float = 0.0
    # Reconstruction also learns units whose every quantizer is wider than the model's narrowest (the 8-bit stem and
    # classifier below 8 bits): off, they keep GPTQ's rounding and their calibrated steps (docs/method.md).
    reconstruct_wide_units: bool = False
    # Reconstruction after GPTQ learns whether to round each weight down or up from the value GPTQ rounded (its
    # error-compensated float weight), starting halfway from that value. False: from GPTQ's choice (learn_gptq_flips;
    # with both off, from GPTQ's rounded weights, where about 2 % of the roundings can move). Off: with our images it
    # raised the KL to float on every cell and lost on cifar_resnet32; it helped real images and larger sets
    # (docs/method.md).
    learn_gptq_rounding: bool = False
    # Reconstruction after GPTQ starts each weight at GPTQ's rounding and may flip it to the other grid neighbour of
    # the value GPTQ rounded (every weight free to move either way; learn_gptq_rounding starts from the value itself).
    # None: on unless learn_gptq_rounding (cifar_resnet20 tuning split, 3 seeds: W4A4 80.73 -> 84.60, W3A3 71.80 ->
    # 75.07, W2A4 level; docs/method.md).
    learn_gptq_flips: bool | None = None
    # Reconstruction after GPTQ fits each block to the float network's block (as BRECQ and QDrop), not to the block
    # with GPTQ's rounded weights and float activations. MobileNetV2 W4A4 tuning split, ours seed 0: 34.0 -> 40.0
    # (KL 2.59 -> 2.19), held out 31.07 -> 38.00 over 3 seeds; cifar_resnet20 tuning split, 3 seeds: level at W4A4,
    # W3A3 and W2A4 (docs/method.md).
    reconstruct_float_targets: bool = True
    # Quantize the inputs of a residual add whose sum is requantized before any layer (ResNets: add -> ReLU).
    # False: they stay in the accumulator domain, as in BRECQ/QDrop/Genie; every layer input is still quantized.
    # None: False below 8-bit activations (+3.7 pt at W4A4 on the tuning split, docs/method.md), True otherwise.
    quantize_residual_adds: bool | None = None
    # Quantize a residual branch's output before it is added to a stream that is already quantized (inverted
    # residuals: MobileNetV2, EfficientNet): Brevitas's graph mode puts it on the stream's quantizer, whose step is
    # set by the stream, mostly wider than the branch's values. None: as quantize_residual_adds. (Before this
    # field such branches stayed quantized whatever quantize_residual_adds said.)
    quantize_residual_branches: bool | None = None
    # model.onnx's weights as int8 (onnxruntime's u8 x s8 kernels: exact and ~3x faster on x86 CPUs with VNNI, but
    # saturating on those without it) or uint8 + 128 (u8 x u8 kernels: exact on every x86 CPU). None: int8 where
    # the CPU exporting has VNNI, as PT2EConfig.reduce_range; set it for the CPU the file will run on.
    onnx_int8_weights: bool | None = None

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits"):
            bits = getattr(self, name)
            if not 2 <= bits <= 16:
                raise BzqError(f"{name}={bits}: Brevitas integer quantization here takes 2 to 16 bits.")
        for name in ("first_last_bits", "depthwise_bits", "first_output_bits"):
            bits = getattr(self, name)
            if bits is not None and not 2 <= bits <= 16:
                raise BzqError(f"{name}={bits}: must be 2 to 16, or None.")
        if self.weight_granularity not in ("per_channel", "per_tensor"):
            raise BzqError("weight_granularity must be 'per_channel' or 'per_tensor'.")
        if self.graph not in ("auto", "fx", "layerwise"):
            raise BzqError("graph must be 'auto', 'fx' or 'layerwise'.")
        if sum(map(bool, (self.gptq, self.gpfq, self.qronos))) > 1:
            raise BzqError("choose one of GPTQ, GPFQ and Qronos.")
        if self.act_range not in (None, "percentile", "mse"):
            raise BzqError(f"act_range must be 'percentile' or 'mse', not {self.act_range!r}.")
        for name in ("weight_range", "depthwise_weight_range"):
            if getattr(self, name) not in (None, "max", "mse"):
                raise BzqError(f"{name} must be 'max' or 'mse', not {getattr(self, name)!r}.")
        if not 0 < self.act_percentile <= 100:
            raise BzqError("act_percentile must be in (0, 100].")
        if self.act_equalization is not None and not 0 <= self.act_equalization <= 1:
            raise BzqError("act_equalization is SmoothQuant's alpha: 0 (off) to 1.")
        if self.reconstruct_iters < 1 or self.reconstruct_batch < 1:
            raise BzqError("reconstruct_iters and reconstruct_batch must be at least 1.")
        if self.reconstruct_round_weight < 0:
            raise BzqError("reconstruct_round_weight must be 0 or more.")
        if not 0 <= self.reconstruct_drop < 1:
            raise BzqError("reconstruct_drop must be in [0, 1).")
        if self.gptq is False and (self.learn_gptq_rounding or self.learn_gptq_flips):
            raise BzqError("learn_gptq_rounding and learn_gptq_flips learn from GPTQ's rounding: not with gptq=false.")
        if self.learn_gptq_rounding and self.learn_gptq_flips:
            raise BzqError("learn_gptq_rounding and learn_gptq_flips are two starts of the same learning: choose one.")
        if not 0 <= self.reconstruct_crop < 1:
            raise BzqError("reconstruct_crop must be in [0, 1): a window's fraction of the side, or 0 for none.")

    @property
    def activation_range(self) -> str:
        return self.act_range or ("mse" if self.use_reconstruction else "percentile")

    @property
    def first_output_width(self) -> int | None:
        """The first layer's output bits where above a_bits (and first_last_bits is set), else None."""
        bits = self.first_output_bits
        return bits if bits and self.first_last_bits and bits > self.a_bits else None

    @property
    def activation_equalization(self) -> float:
        return (0.5 if self.a_bits < 8 else 0.0) if self.act_equalization is None else self.act_equalization

    @property
    def weight_steps(self) -> str:
        return self.weight_range or ("mse" if self.w_bits <= 2 else "max")

    @property
    def symmetric_weights(self) -> bool:
        return self.w_bits > 2 if self.weight_symmetric is None else self.weight_symmetric

    @property
    def residual_adds_quantized(self) -> bool:
        return self.a_bits >= 8 if self.quantize_residual_adds is None else self.quantize_residual_adds

    @property
    def residual_branches_quantized(self) -> bool:
        branches = self.quantize_residual_branches
        return self.residual_adds_quantized if branches is None else branches

    @property
    def use_gptq(self) -> bool:
        return (self.w_bits < 8 and not self.gpfq and not self.qronos) if self.gptq is None else self.gptq

    @property
    def weight_solver(self) -> str | None:
        """The layer-wise rounding solver that runs after calibration: "gptq", "gpfq", "qronos" or None."""
        return "gpfq" if self.gpfq else "qronos" if self.qronos else "gptq" if self.use_gptq else None

    @property
    def use_reconstruction(self) -> bool:
        return min(self.w_bits, self.a_bits) < 8 if self.reconstruct is None else self.reconstruct

    @property
    def use_bias_correction(self) -> bool:
        return not self.use_reconstruction if self.bias_correction is None else self.bias_correction

    @property
    def gptq_flips(self) -> bool:
        return not self.learn_gptq_rounding if self.learn_gptq_flips is None else self.learn_gptq_flips


def prepare_for_brevitas(model: nn.Module, input_size: tuple[int, int, int]) -> nn.Module:
    """A copy of the float model that Brevitas's FX path can trace and BN-merge, for inputs of ``input_size``.

    * timm's ``BatchNormAct2d`` (BN + activation in one module) becomes a plain ``nn.BatchNorm2d`` followed by its
      activation: Brevitas merges BN only when the type is exactly ``nn.BatchNorm2d``, and its quant tensors fail
      inside the fused module.
    * timm's ``Conv2dSame`` (TensorFlow "SAME" padding computed from the input at run time, which FX cannot trace)
      becomes a fixed ``ZeroPad2d`` + ``nn.Conv2d`` for this input size.
    """
    from timm.layers import BatchNormAct2d, Conv2dSame
    from timm.layers.padding import pad_same_arg

    model = copy.deepcopy(model).eval()
    device = next(model.parameters()).device  # replacements built on the CPU failed FX tracing of a CUDA model
    same_inputs: dict[int, tuple[int, int]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: same_inputs.__setitem__(id(mod), tuple(args[0].shape[-2:])))
        for m in model.modules()
        if isinstance(m, Conv2dSame)
    ]
    if hooks:
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=device))
        for h in hooks:
            h.remove()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BatchNormAct2d):
                bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, device=device)
                bn.load_state_dict(child.state_dict())
                # An nn.Identity between BN and activation would make Brevitas requantize the pre-activation.
                parts = [bn.eval(), child.drop, child.act]
                setattr(parent, name, nn.Sequential(*[p for p in parts if not isinstance(p, nn.Identity)]))
            elif isinstance(child, Conv2dSame):
                pads = pad_same_arg(same_inputs[id(child)], child.kernel_size, child.stride, child.dilation)
                conv = nn.Conv2d(
                    child.in_channels,
                    child.out_channels,
                    child.kernel_size,
                    child.stride,
                    0,
                    child.dilation,
                    child.groups,
                    child.bias is not None,
                    device=device,
                )
                conv.load_state_dict(child.state_dict())
                setattr(parent, name, nn.Sequential(nn.ZeroPad2d(pads), conv))
    return model


def _quantizers(config: BrevitasConfig):
    from brevitas.core.scaling import ParameterFromStatsFromParameterScaling
    from brevitas.core.zero_point import ParameterFromStatsFromParameterZeroPoint
    from brevitas.quant import (
        Int8ActPerTensorFloat,
        Int8WeightPerChannelFloat,
        Int8WeightPerChannelFloatMSE,
        Int8WeightPerTensorFloat,
        Int8WeightPerTensorFloatMSE,
        Int32Bias,
        ShiftedUint8WeightPerChannelFloat,
        ShiftedUint8WeightPerChannelFloatMSE,
        ShiftedUint8WeightPerTensorFloat,
        ShiftedUint8WeightPerTensorFloatMSE,
        Uint8ActPerTensorFloat,
    )

    per_channel = config.weight_granularity == "per_channel"
    if config.symmetric_weights:
        base = Int8WeightPerChannelFloat if per_channel else Int8WeightPerTensorFloat
    else:  # integer zero point; "mse" searches the range and the zero point
        base = ShiftedUint8WeightPerChannelFloat if per_channel else ShiftedUint8WeightPerTensorFloat
    searched = {  # the step that minimises each weight tensor's (or channel's) rounding error
        Int8WeightPerChannelFloat: Int8WeightPerChannelFloatMSE,
        Int8WeightPerTensorFloat: Int8WeightPerTensorFloatMSE,
        ShiftedUint8WeightPerChannelFloat: ShiftedUint8WeightPerChannelFloatMSE,
        ShiftedUint8WeightPerTensorFloat: ShiftedUint8WeightPerTensorFloatMSE,
    }[base]
    # Steps and zero points as parameters set once from the weights' statistics: with Brevitas's default stats-from-
    # weights step GPTQ silently changes nothing, and a zero point recomputed from the weights moves while GPTQ
    # updates them, taking the weights it already rounded off the grid.
    frozen = {"scaling_impl": ParameterFromStatsFromParameterScaling}
    if not config.symmetric_weights:
        frozen["zero_point_impl"] = ParameterFromStatsFromParameterZeroPoint
    steps = {r: q.let(**frozen) for r, q in (("max", base), ("mse", searched))}
    plain, depthwise = steps[config.weight_steps], steps[config.depthwise_weight_range or config.weight_steps]
    weight = plain if depthwise is plain else (lambda module: depthwise if _depthwise(module) else plain)
    if (
        config.activation_range == "mse"
    ):  # the clipping range that minimises the quantization error on the calibration set
        from brevitas.quant import Int8ActPerTensorFloatMSE, Uint8ActPerTensorFloatMSE

        return weight, Int8ActPerTensorFloatMSE, Uint8ActPerTensorFloatMSE, Int32Bias
    signed = Int8ActPerTensorFloat.let(high_percentile_q=config.act_percentile)
    unsigned = Uint8ActPerTensorFloat.let(high_percentile_q=config.act_percentile)
    return weight, signed, unsigned, Int32Bias


def _depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def _edge_layers(model: nn.Module, float_model: nn.Module) -> tuple[str | None, str | None]:
    """Names of the first conv and the classifier (timm's pretrained_cfg, else the first/last compute layer)."""
    cfg = getattr(float_model, "pretrained_cfg", {}) or {}
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    first = cfg.get("first_conv") if cfg.get("first_conv") in names else (names[0] if names else None)
    last = cfg.get("classifier") if cfg.get("classifier") in names else (names[-1] if names else None)
    return first, last


def build_quant_model(
    float_model: nn.Module, config: BrevitasConfig, input_size: tuple[int, int, int], batches=None
) -> tuple[nn.Module, dict]:
    """The quantized (not yet calibrated) model, on the float model's device, and a report of how it was built.
    Deterministic: reloading a saved model calls this again and loads the state dict. ``batches`` (calibration
    data) drives activation equalization; without them it is skipped, as on reload, where the saved weights
    already carry it."""
    import brevitas.nn as qnn
    from brevitas.graph.quantize import (
        COMPUTE_LAYER_MAP,
        LAYERWISE_COMPUTE_LAYER_MAP,
        QUANT_ACT_MAP,
        layerwise_quantize,
        preprocess_for_quantize,
        quantize,
    )

    weight, signed, unsigned, bias = _quantizers(config)
    wb, ab = config.w_bits, config.a_bits
    hb = config.first_last_bits or None
    report = {"graph": None, "notes": []}
    device = next(float_model.parameters()).device
    model = prepare_for_brevitas(float_model, input_size)
    first, last = _edge_layers(model, float_model)  # names: the same in the FX graph and the layerwise copy
    edge: set[int] = set()  # ids of the modules about to be quantized that keep first_last_bits, set below

    # Brevitas evaluates lambdas (only lambdas) in layer-map kwargs once per original module.
    dwb = config.depthwise_bits or wb
    w_bits = lambda module: hb if id(module) in edge else (dwb if _depthwise(module) else wb)  # noqa: E731

    graph = None
    if config.graph == "auto" and not config.symmetric_weights:
        report["notes"].append("asymmetric weights: layerwise mode (Brevitas's graph mode cannot carry zero points)")
    elif config.graph in ("auto", "fx"):
        try:
            graph = preprocess_for_quantize(
                model, equalize_iters=config.equalize_iters, merge_bn=True, relu6_to_relu=False
            )
        except Exception as e:
            _fx_failed(config, float_model, "trace", e, report)
    if graph is not None and config.activation_equalization and batches is not None:
        try:
            graph, report["act_equalization"] = _equalize_activations(graph, batches, config.activation_equalization)
        except Exception as e:  # the graph stays as it was: equalization works on a copy
            note = f"activation equalization failed ({type(e).__name__}: {str(e)[:200]}); quantized without it"
            report["notes"].append(note)
            _logger.warning("%s", note)
    if graph is not None:
        edge = {id(m) for n, m in graph.named_modules() if n in (first, last)} if hb else set()
        layer_map = {k: v for k, v in COMPUTE_LAYER_MAP.items()}
        for cls in (nn.Conv1d, nn.Conv2d, nn.Linear):
            qcls, kwargs = COMPUTE_LAYER_MAP[cls]
            layer_map[cls] = (qcls, {**kwargs, "weight_quant": weight, "weight_bit_width": w_bits, "bias_quant": bias})
        act_map = {k: v for k, v in QUANT_ACT_MAP.items()}
        act_map[nn.ReLU] = (qnn.QuantReLU, {"act_quant": unsigned, "bit_width": ab, "return_quant_tensor": True})
        # Brevitas's ReLU6 is a ReLU whose quantizer's fixed 0..6 range does the clipping, so with quantization off
        # (calibration, bias correction, reconstruction's float reference) nothing clipped at 6: a quantizer after
        # it was calibrated on values up to 112 (EfficientNet-Lite1) and got a step ~70x too wide. Every ReLU6
        # keeps its clip in front of the quantizer (set after quantize, by name), and gets the calibrated quantizer:
        # Brevitas's 0..6 range is never calibrated (a 0.4 step at 4 bits; at 8 bits MobileNetV2's ReLU6 outputs,
        # mostly under 2, got 24-94 of the 256 levels).
        relu6 = [n for n, m in graph.named_modules() if isinstance(m, nn.ReLU6)]
        act_map[nn.ReLU6] = act_map[nn.ReLU]
        identity_map = {
            "signed": (qnn.QuantIdentity, {"act_quant": signed, "bit_width": ab, "return_quant_tensor": True}),
            "unsigned": (qnn.QuantIdentity, {"act_quant": unsigned, "bit_width": ab, "return_quant_tensor": True}),
        }
        try:
            with _residual_iterations_capped(graph):
                qmodel = quantize(
                    graph, quant_identity_map=identity_map, compute_layer_map=layer_map, quant_act_map=act_map
                )
        except Exception as e:  # e.g. DLA's tree of residuals: Brevitas's alignment loop does not converge
            _fx_failed(config, float_model, "quantize", e, report)
            graph = None
    if graph is not None:
        for name in relu6:
            qmodel.get_submodule(name).act_quant.fused_activation_quant_proxy.activation_impl = nn.ReLU6()
        report["relu6_calibrated"] = len(relu6)
        _set_edge_activations(qmodel, last, hb, signed, unsigned, report, config.edge_bits_through_pads)
        if config.first_output_width:
            _set_first_output_bits(qmodel, first, config.first_output_width, signed, unsigned, report)
        if config.unsigned_pads:
            _unsigned_pad_requantizers(qmodel, signed, unsigned, report)
        if not config.residual_adds_quantized:
            _unquantize_residual_adds(qmodel, report, branches=not config.residual_branches_quantized)
        qmodel.to(device)  # the quantizers Brevitas and we insert are made on the CPU
        try:
            with torch.no_grad():
                qmodel.eval()(torch.zeros(2, *input_size, device=device))
            report["graph"] = "fx"
        except Exception as e:  # an op Brevitas's quant tensors do not support (e.g. .mean in squeeze-excite)
            _fx_failed(config, float_model, "run", e, report)
            graph = None
    if graph is None:
        model = prepare_for_brevitas(float_model, input_size)  # a fresh copy: a failed FX pass may have merged BN
        if config.activation_equalization and batches is not None:
            report.pop("act_equalization", None)
            report["notes"].append("activation equalization skipped: it needs graph mode")
        edge = {id(m) for n, m in model.named_modules() if n in (first, last)} if hb else set()
        layer_map = dict(LAYERWISE_COMPUTE_LAYER_MAP)
        for cls in (nn.Conv1d, nn.Conv2d, nn.Linear):
            qcls, kwargs = LAYERWISE_COMPUTE_LAYER_MAP[cls]
            layer_map[cls] = (
                qcls,
                {
                    **kwargs,
                    "weight_quant": weight,
                    "weight_bit_width": w_bits,
                    "input_quant": signed,
                    "input_bit_width": lambda module: hb if id(module) in edge else ab,
                    "bias_quant": None,
                },
            )
        qmodel = layerwise_quantize(model, compute_layer_map=layer_map)
        report["graph"] = "layerwise"
        report["notes"].append("layerwise mode: BatchNorm stays in float, activations quantized at layer inputs")
        if config.first_output_width:
            report["notes"].append("first_output_bits skipped: it needs graph mode")
    report["float_layers"] = _float_layers(qmodel)
    return qmodel.to(device).eval(), report


@torch.no_grad()
def _equalize_activations(graph: nn.Module, batches, alpha: float) -> tuple[nn.Module, int]:
    """Brevitas's activation equalization over a copy of the float graph; returns it and how many regions it scaled.

    No multiplication node is added (``add_mul_node=False``): only regions whose sources and sinks can absorb the
    scale are equalized, so the graph keeps its structure and a saved model reloads from its state dict."""
    from brevitas.graph.equalize import activation_equalization_mode

    graph = copy.deepcopy(graph)
    device = next(graph.parameters()).device
    with activation_equalization_mode(graph, alpha, add_mul_node=False, layerwise=False) as eq:
        for images in progress(batches, desc="activation equalization", unit="batch"):
            graph(images.to(device))
    return graph, sum(s.numel() > 1 for s in eq.scale_factors)


def _fx_failed(config: BrevitasConfig, model: nn.Module, step: str, e: Exception, report: dict) -> None:
    """With ``graph="fx"`` a failed graph-mode ``step`` (trace, quantize, run) is an error; with ``auto`` it is a
    note, and the caller goes on in layerwise mode."""
    if config.graph == "fx":
        raise BzqError(f"Brevitas graph mode cannot {step} {type(model).__name__}: {e}; try graph=layerwise.") from e
    note = f"FX mode failed to {step} the model ({type(e).__name__}: {str(e)[:200]}); used layerwise mode"
    report["notes"].append(note)
    _logger.warning("%s", note)


@contextlib.contextmanager
def _residual_iterations_capped(graph):
    """Brevitas aligns the quantizers around every add and concatenation in a loop with a cap of 9999 passes, each
    slower than the last; on some graphs (DLA) it never converges. Allow 10 passes per add/concatenation (DenseNet-121
    needs 67 for 62), after which Brevitas raises and the caller falls back to layerwise mode."""
    import brevitas.graph.quantize_impl as impl

    joins = sum(
        (n.op == "call_function" and n.target in [*impl.ADD_FNS, torch.cat])
        or (n.op == "call_method" and n.target in impl.ADD_METHODS)
        for n in graph.graph.nodes
    )
    saved, impl.MAX_RESIDUAL_ITERS = impl.MAX_RESIDUAL_ITERS, 10 * joins + 20
    try:
        yield
    finally:
        impl.MAX_RESIDUAL_ITERS = saved


def _set_edge_activations(qmodel, last, hb, signed, unsigned, report, through_pads: bool) -> None:
    """FX mode quantizes the network input and the classifier input at a_bits, and adds a quantizer on the logits.
    Give the input and classifier-input quantizers ``first_last_bits`` and keep the logits in float.
    ``through_pads``: also the quantizer Brevitas puts on the padded input (a padding layer in front of the first
    convolution), which it otherwise takes at a_bits."""
    import brevitas.nn as qnn

    graph = qmodel.graph
    modules = dict(qmodel.named_modules())

    def carries_input(node) -> bool:  # the network input, or (through_pads) it padded and quantized
        passes = (nn.ZeroPad2d, nn.ConstantPad2d, qnn.QuantIdentity) if through_pads else ()
        while getattr(node, "op", None) == "call_module" and isinstance(modules.get(node.target), passes):
            node = node.args[0]
        return getattr(node, "op", None) == "placeholder"

    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), qnn.QuantIdentity):
            continue
        src = node.args[0] if node.args else None
        feeds_classifier = any(u.op == "call_module" and u.target == last for u in node.users)
        after_classifier = getattr(src, "op", None) == "call_module" and src.target == last
        is_input = carries_input(src)
        if after_classifier and all(u.op == "output" for u in node.users):
            qmodel.add_submodule(node.target, nn.Identity())
            qmodel.get_submodule(last).return_quant_tensor = False
            report["notes"].append("logits left in float")
        elif hb and (is_input or feeds_classifier):
            qmodel.add_submodule(node.target, _requantizer(modules[node.target], hb, signed, unsigned))
    qmodel.recompile()


def _set_first_output_bits(qmodel, first, bits, signed, unsigned, report) -> None:
    """Give the first activation quantizer after the first layer (through ops that pass one tensor on, such as a
    merged BN's leftovers or padding) ``bits``, keeping its activation (a ReLU6 keeps its clip)."""
    import brevitas.nn as qnn

    nodes = [n for n in qmodel.graph.nodes if n.op == "call_module" and n.target == first]
    node = nodes[0] if len(nodes) == 1 else None
    while node is not None and len(node.users) == 1:
        (node,) = node.users
        module = qmodel.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, qnn.QuantReLU | qnn.QuantIdentity):
            qmodel.add_submodule(node.target, _requantizer(module, bits, signed, unsigned))
            report["first_output"] = f"{node.target} at {bits} bits"
            return
        if module is not None and any(p.requires_grad for p in module.parameters()):
            break  # another layer: no quantizer of the first layer's own output
    report["notes"].append(f"first_output_bits: no activation quantizer right after {first}; left at a_bits")


def _unsigned_pad_requantizers(qmodel, signed, unsigned, report) -> None:
    """Brevitas requantizes a zero-padded tensor with a signed quantizer, also where the pad's input is a ReLU's
    unsigned output (EfficientNet-Lite's stride-2 depthwise convolutions): half the levels go unused. Make those
    requantizers unsigned at the same bits; zeros lie on either grid."""
    import brevitas.nn as qnn

    calls = [n for n in qmodel.graph.nodes if n.op == "call_module"]
    modules = _call_targets(qmodel)
    uses = collections.Counter(id(modules[n.target]) for n in calls)
    count = 0
    for node in calls:
        old = modules[node.target]
        if not isinstance(old, qnn.QuantIdentity) or not old.act_quant.is_signed or uses[id(old)] > 1:
            continue  # a shared quantizer also serves other tensors
        src, pads = node.args[0], []
        while getattr(src, "op", None) == "call_module" and isinstance(modules.get(src.target), nn.ConstantPad2d):
            pads.append(modules[src.target])
            src = src.args[0]
        producer = modules.get(src.target) if getattr(src, "op", None) == "call_module" else None
        if (pads and all(p.value == 0 for p in pads) and isinstance(producer, qnn.QuantReLU | qnn.QuantIdentity)
                and not producer.act_quant.is_signed):  # fmt: skip
            bits = int(old.act_quant.bit_width())
            qmodel.add_submodule(node.target, _requantizer(old, bits, signed, unsigned, is_signed=False))
            count += 1
    qmodel.recompile()
    report["unsigned_pad_requantizers"] = count


def _requantizer(old, bits: int, signed, unsigned, is_signed: bool | None = None):
    """A fresh quantizer like ``old`` (its class, sign, output type, a ReLU6's clip) at ``bits``; ``is_signed``
    overrides the sign."""
    proxy = old.act_quant
    act = signed if (proxy.is_signed if is_signed is None else is_signed) else unsigned
    new = type(old)(act_quant=act, bit_width=bits, return_quant_tensor=old.return_quant_tensor)
    if isinstance(proxy.fused_activation_quant_proxy.activation_impl, nn.ReLU6):
        new.act_quant.fused_activation_quant_proxy.activation_impl = nn.ReLU6()
    return new


def _unquantize_residual_adds(qmodel, report, branches: bool = True) -> None:
    """Remove the quantizers that only feed residual adds whose sums are requantized before any layer; the layers
    feeding them return float (their accumulator, dequantized).

    ``branches``: also the calls of a quantizer shared with the stream that feed such an add from a residual branch
    (through timm's eval-mode drop_path), call by call. Without it a shared quantizer goes only if every call of it
    qualifies, as models saved before ``quantize_residual_branches`` were built."""
    import brevitas.nn as qnn

    graph = qmodel.graph
    modules = _call_targets(qmodel) if branches else dict(qmodel.named_modules())
    adds = (operator.add, operator.iadd, torch.add)

    def is_act(node) -> bool:
        return node.op == "call_module" and isinstance(modules.get(node.target), (qnn.QuantReLU, qnn.QuantIdentity))

    def users(node) -> list:  # with branches, looking through pass-through modules
        return [v for u in node.users for v in (users(u) if branches and _passes_through(u, modules) else [u])]

    def feeds_requantized_add(node) -> bool:
        found = users(node)
        return bool(found) and all(u.op == "call_function" and u.target in adds and all(map(is_act, u.users))
                                   for u in found)  # fmt: skip

    calls: dict[str, list] = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), qnn.QuantIdentity):
            calls.setdefault(node.target, []).append(node)
    in_float = set()  # the adds whose inputs are left unquantized
    for nodes in calls.values():
        if branches:
            nodes = [n for n in nodes if feeds_requantized_add(n)]
        elif not all(map(feeds_requantized_add, nodes)):
            continue
        for node in nodes:
            in_float.update(u.name for u in users(node))
            src = node.args[0]
            if src.op == "call_module" and hasattr(modules.get(src.target), "return_quant_tensor"):
                modules[src.target].return_quant_tensor = False
            node.replace_all_uses_with(src)
            graph.erase_node(node)
    graph.lint()
    qmodel.recompile()
    qmodel.delete_all_unused_submodules()
    report["residual_adds_in_float"] = len(in_float)


def _call_targets(qmodel) -> dict[str, nn.Module]:
    """Every module the graph calls, by call target: named_modules() lists a shared module once, under one name."""
    return {n.target: qmodel.get_submodule(n.target) for n in qmodel.graph.nodes if n.op == "call_module"}


def _passes_through(node, modules) -> bool:
    return node.op == "call_module" and isinstance(modules.get(node.target), nn.Identity) and len(node.args) == 1


def _float_layers(qmodel: nn.Module) -> list[str]:
    """Names of layers with weight matrices that were left unquantized (norm layers are meant to stay float)."""
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer

    return [
        f"{n} ({type(m).__name__})"
        for n, m in qmodel.named_modules()
        if not isinstance(m, QuantWeightBiasInputOutputLayer)
        and isinstance(getattr(m, "weight", None), nn.Parameter)
        and m.weight.dim() >= 2
    ]


def _weights(qmodel: nn.Module) -> dict[str, torch.Tensor]:
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer

    return {
        n: m.quant_weight().value.detach().clone()
        for n, m in qmodel.named_modules()
        if isinstance(m, QuantWeightBiasInputOutputLayer)
    }


@torch.no_grad()
def calibrate(qmodel: nn.Module, batches) -> None:
    """Collect activation statistics over any calibration data (Brevitas ``calibration_mode``)."""
    from brevitas.graph.calibrate import calibration_mode

    batches = as_batches(batches)
    device = next(qmodel.parameters()).device
    qmodel(next(iter(batches)).to(device))  # some quantizers initialise their scales on the first forward
    with calibration_mode(qmodel):
        for images in progress(batches, desc="calibration", unit="batch"):
            qmodel(images.to(device))


@torch.no_grad()
def optimise_weights(
    qmodel: nn.Module, batches, method: str = "gptq", act_order: bool = True, keep_unrounded: bool = False
) -> float:
    """GPTQ, GPFQ or Qronos over the set (one pass per layer); returns the fraction of quantized weights changed.

    GPTQ fits each layer's weights to its quantized input; GPFQ and Qronos fit the quantized layer on its quantized
    input to the float layer on its float input, so they also correct the error carried from earlier layers.
    ``act_order`` (``BrevitasConfig.gptq_act_order``'s default): the input channels with the largest Hessian diagonal
    (input energy) go first. ``keep_unrounded`` (GPTQ only): each layer keeps its weights as they were just before
    GPTQ rounded them (error-compensated, not on the grid) in ``layer.bzq_unrounded``, for :func:`reconstruct` to
    learn the rounding of."""
    from brevitas.graph.gpfq import gpfq_mode
    from brevitas.graph.gptq import GPTQ, gptq_mode
    from brevitas.graph.qronos import Qronos

    class _GPTQ(GPTQ):
        # GPTQ rounds one input column at a time after compensating it for the columns rounded before: the value it
        # rounds is the one read here, just before get_quant_weights quantizes that column (single_layer_update's
        # flattened [groups, out / groups, columns] view of the layer's weight, which it updates in place).
        def get_quant_weights(self, i, i1, permutation_list, with_quant_history=False):
            if not hasattr(self, "unrounded"):
                self.unrounded = self.layer.weight.detach().flatten(1).clone()
            columns = self.layer.weight.detach().flatten(1).view(self.groups, -1, self.unrounded.shape[-1])
            record = self.unrounded.view(self.groups, -1, self.unrounded.shape[-1])
            for g, perm in enumerate(permutation_list):
                record[g, :, perm[i1 + i]] = columns[g, :, perm[i1 + i]]
            return super().get_quant_weights(i, i1, permutation_list, with_quant_history)

        def single_layer_update(self, *args, **kwargs):
            super().single_layer_update(*args, **kwargs)
            if hasattr(self, "unrounded"):
                self.layer.bzq_unrounded = self.unrounded.view_as(self.layer.weight)
                del self.unrounded

    class _Qronos(Qronos):
        def single_layer_update(self, *args, **kwargs):
            # A dead input channel (all zeros) makes a depthwise group's Hessian zero and Brevitas's Cholesky fails
            # for the whole layer. Any weight serves a dead input; a unit diagonal there keeps the solve defined
            # (its G row is zero, so the solver drives those weights to 0).
            diag = self.H.diagonal(dim1=-2, dim2=-1)
            diag[diag == 0] = diag[diag > 0].mean() if (diag > 0).any() else 1.0
            return super().single_layer_update(*args, **kwargs)

    if keep_unrounded and method != "gptq":
        raise BzqError("keep_unrounded is for GPTQ, which rounds weights it first compensates.")
    modes = {
        "gptq": functools.partial(gptq_mode, gptq_class=_GPTQ) if keep_unrounded else gptq_mode,
        "gpfq": gpfq_mode,
        "qronos": functools.partial(gpfq_mode, algorithm_impl=_Qronos),
    }
    if method not in modes:
        raise BzqError(f"unknown weight solver {method!r}: choose {', '.join(modes)}.")
    batches = as_batches(batches)
    device = next(qmodel.parameters()).device
    before = _weights(qmodel)
    # The GPFQ family reads the float input with every quantizer off: the float weights must stay beside the
    # rounded ones (Brevitas's weight_orig), and go once the solver is done so the state dict is unchanged.
    float_reference = method != "gptq"
    with modes[method](
        qmodel, use_quant_activations=True, create_weight_orig=float_reference, act_order=act_order
    ) as opt:
        for _ in progress(range(opt.num_layers), desc=method.upper(), unit="layer"):
            for images in batches:
                opt.model(images.to(device))
            opt.update()
    for module in qmodel.modules():
        if "weight_orig" in module._buffers:
            del module._buffers["weight_orig"]
    after = _weights(qmodel)
    changed = sum((before[k] != after[k]).sum().item() for k in before)
    if changed == 0:
        raise BzqError(f"{method.upper()} ran but changed no quantized weight: the weight quantizer ignores it.")
    return changed / sum(v.numel() for v in before.values())


@torch.no_grad()
def correct_biases(qmodel: nn.Module, batches) -> None:
    """Shift each layer's bias by the mean output error measured on the set (Brevitas ``bias_correction_mode``)."""
    from brevitas.graph.calibrate import bias_correction_mode

    batches = as_batches(batches)
    device = next(qmodel.parameters()).device
    with bias_correction_mode(qmodel):
        for images in progress(batches, desc="bias correction", unit="batch"):
            qmodel(images.to(device))


@contextlib.contextmanager
def channel_bias_steps():
    """For the duration, convolutions compare their bias's step with their output's channel by channel.

    Brevitas 0.13 checks ``torch.allclose(bias.scale, output_scale)`` on every quantized convolution's forward,
    with shapes (C,) and (1, C, 1, 1): broadcast, that is a C x C comparison (0.4-2.5 ms a layer, a fifth of a
    reconstruction step on MobileNetV2's 7 px blocks), and it fails wherever the steps differ between channels.
    Viewing the bias's step in the output's shape first makes it the per-channel check Brevitas means: the output
    values are the same; only the output quant tensor's zero point differs (zero, where the steps agree)."""
    from brevitas.quant_tensor import IntQuantTensor
    from brevitas.quant_tensor.int_torch_handler import INT_QUANT_TENSOR_FN_HANDLER as handlers

    def per_channel(handler):
        def conv(quant_input, quant_weight, bias=None, *args, **kwargs):
            if isinstance(bias, IntQuantTensor) and isinstance(quant_input, IntQuantTensor) and bias.scale.dim() == 1:
                bias = bias.set(scale=bias.scale.view(1, -1, *[1] * (quant_input.value.dim() - 2)))
            return handler(quant_input, quant_weight, bias, *args, **kwargs)

        return conv

    saved = {fn: handlers[fn] for fn in (F.conv1d, F.conv2d, F.conv3d) if fn in handlers}
    handlers.update({fn: per_channel(handler) for fn, handler in saved.items()})
    try:
        yield
    finally:
        handlers.update(saved)


def quantize_brevitas(
    float_model: nn.Module, calibration, config: BrevitasConfig | None = None
) -> tuple[nn.Module, dict]:
    """Quantize a copy of ``float_model`` with Brevitas, calibrated on ``calibration`` (any calibration data).

    Steps: graph preprocessing (BN merge, weight and activation equalisation), quantization, activation
    calibration, GPTQ (or GPFQ) on the weights, block reconstruction (learned rounding and step sizes), bias
    correction. Every step iterates the same calibration batches.
    """
    with channel_bias_steps():
        return _quantize_brevitas(float_model, calibration, config or BrevitasConfig())


def _quantize_brevitas(float_model: nn.Module, calibration, config: BrevitasConfig) -> tuple[nn.Module, dict]:
    batches = as_batches(calibration, config.calib_batch_size)
    qmodel, report = build_quant_model(float_model, config, batches.input_size, batches)
    calibrate(qmodel, batches)
    report["act_range"] = config.activation_range
    int8_weights = has_int8_dot_product() if config.onnx_int8_weights is None else config.onnx_int8_weights
    report["onnx_weights"] = "int8" if int8_weights else "uint8"  # what model.onnx will store (see _save)
    report["weight_grid"] = f"{'symmetric' if config.symmetric_weights else 'asymmetric'}, {config.weight_steps} steps"
    if config.depthwise_weight_range not in (None, config.weight_steps):
        report["weight_grid"] += f" ({config.depthwise_weight_range} steps in depthwise convolutions)"
    report["weights_changed_by_gptq"] = 0.0
    float_targets = config.weight_solver and config.use_reconstruction and config.reconstruct_float_targets
    reference = copy.deepcopy(qmodel) if float_targets else None  # the weights before the solver rounds them
    if config.weight_solver:
        report["weights_changed_by_gptq"] = optimise_weights(
            qmodel,
            batches,
            config.weight_solver,
            config.gptq_act_order,
            keep_unrounded=config.use_reconstruction
            and config.weight_solver == "gptq"
            and (config.learn_gptq_rounding or config.gptq_flips),
        )
    if config.use_reconstruction:
        start = time.perf_counter()
        settings = ReconstructionConfig(
            iterations=config.reconstruct_iters,
            batch_size=config.reconstruct_batch,
            learn_scales=config.learn_act_scales,
            weight_scale_lr=1e-3 if config.learn_weight_scales else 0.0,
            drop=config.reconstruct_drop,
            round_weight=config.reconstruct_round_weight,
            fisher=config.reconstruct_fisher,
            flip=config.reconstruct_flip,
            crop=config.reconstruct_crop,
            wide_units=config.reconstruct_wide_units,
            gptq_flips=config.gptq_flips,
        )
        report["reconstruction"] = reconstruct(qmodel, batches, settings, reference)
        report["reconstruction"]["seconds"] = round(time.perf_counter() - start, 2)
    report["bias_correction"] = config.use_bias_correction
    if config.use_bias_correction:
        correct_biases(qmodel, batches)
    return qmodel.eval(), report


def _save(qmodel: nn.Module, out: Path, example: torch.Tensor, report: dict, export_onnx: bool) -> dict:
    """``model.safetensors`` (the state dict) and, on request, ``model.onnx`` (QCDQ)."""
    from safetensors.torch import save_file

    # Brevitas shares scale parameters between quantizers; the file keeps a copy under every name.
    state = {k: v.detach().cpu().clone().contiguous() for k, v in qmodel.state_dict().items()}
    write_atomic(out / "model.safetensors", lambda tmp: save_file(state, str(tmp)))
    files = {"weights": "model.safetensors"}
    if export_onnx:
        files["onnx"] = _export_onnx(qmodel, example, out / "model.onnx", report)
    return files


def _export_onnx(qmodel: nn.Module, example: torch.Tensor, path: Path, report: dict) -> str | None:
    """ONNX QCDQ export of a CPU copy of ``qmodel``, then its parity with ``qmodel`` on ``example`` in onnxruntime
    (``report["onnx_parity"]``). A failure is recorded in ``report["failed_steps"]``, not raised (the safetensors
    state is the reference); a failed export leaves no file. The weights are int8 where quantization decided so
    (``report["onnx_weights"]``), uint8 + 128 otherwise."""
    try:
        import onnxruntime  # noqa: F401
        from brevitas.export import export_onnx_qcdq  # noqa: F401
    except ImportError as e:
        report.setdefault("notes", []).append(
            f"ONNX export skipped: {e} (pip install 'brevitas-zeroshot[export]', or pass --no-onnx)"
        )
        return None
    model = copy.deepcopy(qmodel).cpu()
    try:
        int8_weights = report.setdefault("onnx_weights", "uint8") == "int8"
        write_atomic(path, lambda tmp: export_qcdq(model, example.cpu(), tmp, int8_weights))
    except Exception as e:  # an operator the exporter does not know, a full disk...
        report.setdefault("failed_steps", []).append(f"ONNX export: {type(e).__name__}: {str(e)[:200]}")
        return None
    report["onnx_parity"] = parity = onnx_parity(model, path, example)
    if not parity["passed"]:
        report.setdefault("failed_steps", []).append(
            f"ONNX parity: {path.name} differs from the Brevitas model in onnxruntime (top-1 agreement "
            f"{parity.get('agreement')} %, median |diff| {parity.get('median_abs_diff')}); `bzq push` will not "
            "publish it"
        )
    return path.name


# Fields added since models were first saved, with the value a model saved without them was built with.
_ADDED = {
    "quantize_residual_adds": True,
    "weight_symmetric": True,
    "gptq_act_order": False,
    "qronos": False,
    "depthwise_weight_range": None,
    "onnx_int8_weights": None,  # export only: a cell or model made without it is the same model
    "learn_gptq_rounding": False,
    "reconstruct_flip": False,
    "reconstruct_crop": 0.0,
    "learn_gptq_flips": False,
    "act_equalization": 0.0,
    "reconstruct_float_targets": False,
    "quantize_residual_branches": True,
    "first_output_bits": None,
    "edge_bits_through_pads": False,
    "unsigned_pads": False,
    "reconstruct_wide_units": True,
}


def _load(folder: Path, meta: dict) -> nn.Module:
    """Rebuild the quantized model from the float architecture and the saved config, then load its state."""
    from brevitas.graph.calibrate import load_quant_model_mode
    from safetensors.torch import load_file

    from ..models import load_model
    from ._api import config_from_dict

    config = config_from_dict(BrevitasConfig, {**_ADDED, **meta["quantization"]})
    float_model, _ = load_model(meta["model"], pretrained=False)
    model, _ = build_quant_model(float_model, config, tuple(meta["data_config"]["input_size"]))
    with load_quant_model_mode(model):
        missing, unexpected = model.load_state_dict(load_file(str(folder / meta["files"]["weights"])), strict=False)
    # Files written before the weights' zero points were frozen lack them: they are set from the saved weights on
    # the first forward pass, as they were then computed on every pass.
    missing = [k for k in missing if not k.endswith("weight_quant.tensor_quant.zero_point_impl.value")]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


register_backend(BrevitasConfig, "brevitas", quantize=quantize_brevitas, save=_save, load=_load, added=_ADDED)
