"""ONNX QCDQ export that onnxruntime runs as Brevitas does, on every x86 CPU, and the check that it does.

onnxruntime fuses QuantizeLinear/DequantizeLinear pairs around a Conv or Gemm into integer kernels. For uint8
activations and int8 weights, x86 CPUs without VNNI run a kernel that adds pairs of u8×s8 products in 16 bits and
saturates (255 × 127 × 2 > 32767), so an 8-bit layer's answers change. Stored as uint8 with zero point 128, the same
integer weights select the u8×u8 kernels, which are exact everywhere (onnxruntime's own `session.x64quantprecision`
option does this conversion at load time, but fails on initialisers that Brevitas's export shares between layers).
Signed activations (a linear bottleneck's output, a residual sum) are re-stored the same way: onnxruntime's x86
QLinearConv does not take them beside uint8 weights, and such a convolution stays a float Conv between Dequantize and
Quantize nodes (MobileNetV2 W8A8: 15 of 52, and the whole model slower than float).
"""

from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["export_qcdq", "integer_layers", "onnx_parity", "onnx_session"]

INPUT, OUTPUT = "input", "logits"


def export_qcdq(qmodel: nn.Module, example: torch.Tensor, path: Path, int8_weights: bool = False) -> None:
    """Write ``qmodel`` (a CPU Brevitas model) to ``path`` as ONNX QCDQ with a dynamic batch and uint8 activations;
    the weights uint8 + 128 (exact on every x86 CPU) or, with ``int8_weights``, int8 (onnxruntime's u8×s8 kernels:
    exact and ~3× faster on CPUs with VNNI, saturating on x86 CPUs without it)."""
    import onnx
    from brevitas.export import export_onnx_qcdq

    export_onnx_qcdq(
        qmodel,
        args=example[:1],
        export_path=str(path),
        opset_version=17,
        dynamo=False,
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
    )
    proto = onnx.load(str(path))
    _unsigned_for_onnxruntime(proto.graph, weights=not int8_weights)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _unsigned_for_onnxruntime(graph, weights: bool = True) -> tuple[int, int]:
    """Re-store every int8 weight (an initialiser, possibly clipped, then dequantized) as uint8 + 128, its clip bounds
    and zero point with it (``weights``; else each weight keeps int8 values with a zero point of its own, as
    onnxruntime's ``session.x64quantprecision`` option needs), and every int8 activation (a QuantizeLinear of a
    computed tensor, possibly clipped, then dequantized) with zero points and clip bounds + 128: the same values.
    Returns how many weight DequantizeLinear and activation QuantizeLinear nodes were converted."""
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def int8(name: str) -> bool:
        return name in inits and inits[name].data_type == onnx.TensorProto.INT8

    targets = []  # (DequantizeLinear, the Clip before it or None), decided on the graph as exported
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3 or not int8(node.input[2]):
            continue
        clip = producer.get(node.input[0])
        if clip is not None and clip.op_type == "Clip" and len(clip.input) == 3 and all(map(int8, clip.input)):
            targets.append((node, clip))
        elif int8(node.input[0]):
            targets.append((node, None))  # else an activation: its values come from a QuantizeLinear

    added: dict = {}  # new name -> tensor: an initialiser (or Clip) several nodes share is converted once

    def shifted(name: str, by: int = 128) -> str:
        new = f"{name}_u8" if by else f"{name}_own"
        if new not in added:
            values = numpy_helper.to_array(inits[name]).astype(np.int16) + by
            added[new] = numpy_helper.from_array(values.astype(np.uint8 if by else np.int8), new)
        return new

    for node, clip in targets:
        zero_point = f"{node.name}_zero_point"  # each node its own: Brevitas shares them between layers
        inits[zero_point] = inits[node.input[2]]
        if not weights:
            node.input[2] = shifted(zero_point, by=0)
            continue
        if clip is None:
            node.input[0] = shifted(node.input[0])
        elif not clip.input[0].endswith("_u8"):
            names = [shifted(name) for name in clip.input]
            del clip.input[:]
            clip.input.extend(names)
        node.input[2] = shifted(zero_point)
    activations = 0
    for quant in graph.node:
        if quant.op_type != "QuantizeLinear" or len(quant.input) < 3 or not int8(quant.input[2]):
            continue
        users, chain = list(consumers.get(quant.output[0], [])), []
        while users:  # what reads the integers: Clips (narrower bit widths), then DequantizeLinear nodes
            node = users.pop()
            if node.op_type == "Clip" and len(node.input) == 3 and all(map(int8, node.input[1:])):
                users += consumers.get(node.output[0], [])
            elif not (node.op_type == "DequantizeLinear" and len(node.input) == 3 and int8(node.input[2])):
                break  # an integer consumer this conversion does not know: the activation stays int8
            chain.append(node)
        else:
            quant.input[2] = shifted(quant.input[2])
            for node in chain:
                first = 1 if node.op_type == "Clip" else 2  # a Clip's bounds; a DequantizeLinear's zero point
                names = [shifted(name) for name in node.input[first:]]
                del node.input[first:]
                node.input.extend(names)
            activations += 1
    graph.initializer.extend(added.values())
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return len(targets), activations


def onnx_session(path: str | Path, threads: int | None = None, optimised: str | Path | None = None):
    """An onnxruntime CPU session with its default optimisations (what a user gets), optionally ``threads``; with
    ``optimised``, the graph as onnxruntime optimised it is written there (see :func:`integer_layers`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if optimised:
        options.optimized_model_filepath = str(optimised)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def integer_layers(optimised: str | Path) -> dict:
    """How many convolution and linear layers of an optimised graph run as integer kernels, and how many in float
    (between DequantizeLinear and QuantizeLinear nodes onnxruntime could not fuse)."""
    import onnx

    ops = [node.op_type for node in onnx.load(str(optimised)).graph.node]
    integer = sum(ops.count(op) for op in ("QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger"))
    return {"int8_layers": integer, "float_layers": sum(ops.count(op) for op in ("Conv", "Gemm", "MatMul"))}


@torch.no_grad()
def onnx_parity(qmodel: nn.Module, path: str | Path, images: torch.Tensor) -> dict:
    """Run ``images`` through the ONNX file in onnxruntime (default optimisations) and through ``qmodel``; compare.

    Float arithmetic in another order puts a few values on the other side of an 8-bit rounding boundary, and a deep
    network carries those flips on (MobileNetV2 W8A8: median 1.7 % of the largest logit, without any onnxruntime
    fusion). So the export is held to the model's own sensitivity: ``qmodel`` is also run on the images scaled by
    1 + 2^-20 (a change of the size of float rounding) and in channels-last layout (other kernels, sums in another
    order). ``passed`` when the median |difference| of the logits is at most 4 times the median change those cause
    (and at least 1e-3 of the largest logit is allowed), and the
    predicted classes agree on at least 90 % of the images, a disagreement between two logits closer than twice
    that image's largest change not counting. Measured: MobileNetV2 W8A8 differs by 0.139 logits where its own
    rounding sensitivity is 0.209 (passes); a wrong export or a saturating kernel moves far more than the model's
    sensitivity (onnxruntime's saturating u8 x s8 kernels on ResNet-20 W8A8: 0.233 where it is 0; one layer's
    weights negated: 75 % of the largest logit).
    """
    import onnxruntime as ort

    images = images.detach().float().cpu()
    qmodel = qmodel.cpu()
    expected = qmodel(images).float()
    noise = (qmodel(images * (1 + 2**-20)).float() - expected).abs()
    qmodel.to(memory_format=torch.channels_last)  # other convolution kernels: sums in another order
    try:
        other_order = qmodel(images.contiguous(memory_format=torch.channels_last)).float()
    finally:
        qmodel.to(memory_format=torch.contiguous_format)
    noise = torch.maximum(noise, (other_order - expected).abs())
    session = onnx_session(path)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]).float()
    if got.shape != expected.shape:
        return {"passed": False, "reason": f"output shape {tuple(got.shape)}, expected {tuple(expected.shape)}"}
    diff = (got - expected).abs()
    scale = expected.abs().max().clamp_min(1e-12)
    tolerance = torch.maximum(4 * noise.median(), 1e-3 * scale)
    same = got.argmax(1) == expected.argmax(1)
    top2 = expected.topk(min(2, expected.shape[1]), dim=1).values
    ties = ~same & (top2[:, 0] - top2[:, -1] <= 2 * torch.maximum(noise.max(1).values, tolerance))
    return {
        "passed": bool((same | ties).float().mean() >= 0.9 and diff.median() <= tolerance),
        "images": len(images),
        "agreement": round(100 * same.float().mean().item(), 2),
        "near_ties": int(ties.sum()),
        "median_abs_diff": float(f"{diff.median():.3g}"),
        "max_abs_diff": float(f"{diff.max():.3g}"),
        "max_abs_logit": float(f"{scale:.3g}"),
        "rounding_sensitivity": float(f"{noise.median():.3g}"),
        "runtime": f"onnxruntime {ort.__version__} (CPU, default optimisations)",
    }
