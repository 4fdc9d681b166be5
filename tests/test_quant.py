import contextlib
import copy
import dataclasses
import itertools
import json
import logging
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import have_cxx, random_r20
from torch import nn

from brevitas_zeroshot import BzqError, create_loader, evaluate, load_model
from brevitas_zeroshot._utils import has_int8_dot_product
from brevitas_zeroshot.models import resolve_data_config
from brevitas_zeroshot.quant import BrevitasConfig, PT2EConfig, load_quantized, quantize, save_quantized
from brevitas_zeroshot.quant._brevitas import build_quant_model, calibrate, optimise_weights
from brevitas_zeroshot.synth._sources import create_calibration_set


def _value(x):
    return getattr(x, "value", x)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_changes_weights_and_lowers_layer_error(resnet20, act_order, monkeypatch):
    model, cfg = resnet20
    calib = create_calibration_set("gaussian", model, cfg, num_images=64)
    loader = calib.loader(32)
    qmodel, _ = build_quant_model(model, BrevitasConfig(w_bits=4, a_bits=4), (3, 32, 32))
    calibrate(qmodel, loader)
    conv = qmodel.get_submodule("layer1.0.conv2")
    w_float = conv.weight.detach().clone()
    q_before = conv.quant_weight().value.detach().clone()  # round-to-nearest
    order = []  # GPTQ's column order in each layer it updated
    from brevitas.graph import gptq

    real_update = gptq.GPTQ.single_layer_update

    def recording_update(self, *a, **k):
        order.append(self.act_order)
        return real_update(self, *a, **k)

    monkeypatch.setattr(gptq.GPTQ, "single_layer_update", recording_update)
    changed = optimise_weights(qmodel, loader, "gptq", act_order=act_order)
    q_after = conv.quant_weight().value.detach()
    # The layer's inputs as GPTQ saw them: earlier layers already updated, activations quantized.
    inputs = []
    handle = conv.register_forward_pre_hook(lambda m, args: inputs.append(_value(args[0]).detach()))
    with torch.no_grad():
        for x, _ in loader:
            qmodel(x)
    handle.remove()
    x = torch.cat(inputs)

    def error(w):
        return (F.conv2d(x, w - w_float, None, conv.stride, conv.padding)).norm()

    assert order and set(order) == {act_order}
    assert changed > 0.01 and not torch.equal(q_before, q_after)
    assert error(q_after) < 0.95 * error(q_before), (error(q_after), error(q_before))


def test_gpfq_and_qronos_correct_the_error_carried_from_earlier_layers_better_than_gptq(resnet20):
    """GPTQ fits a layer to its quantized input; GPFQ and Qronos fit the quantized layer on its quantized input to the
    float layer on its float input. Deep in a W4A4 network the latter error is the one that reaches the output."""
    from brevitas.graph.calibrate import quantization_status_manager

    model, cfg = resnet20
    loader = create_calibration_set("gaussian", model, cfg, num_images=32).loader(32)
    base, _ = build_quant_model(model, BrevitasConfig(w_bits=4, a_bits=4), (3, 32, 32))
    calibrate(base, loader)
    keys = set(base.state_dict())
    name = "layer3.0.conv2"
    w_float = base.get_submodule(name).weight.detach().clone()

    def layer_input(qmodel, quantized):
        inputs = []
        handle = qmodel.get_submodule(name).register_forward_pre_hook(
            lambda m, args: inputs.append(_value(args[0]).detach())
        )
        off = dict(disable_act_quant=True, disable_weight_quant=True, disable_bias_quant=True, is_training=False)
        with torch.no_grad(), contextlib.nullcontext() if quantized else quantization_status_manager(qmodel, **off):
            for x, _ in loader:
                qmodel(x)
        handle.remove()
        return torch.cat(inputs)

    conv = base.get_submodule(name)
    target = F.conv2d(layer_input(base, False), w_float, None, conv.stride, conv.padding)
    errors = {}
    for method in ("gptq", "gpfq", "qronos"):
        qmodel = copy.deepcopy(base)
        optimise_weights(qmodel, loader, method, act_order=True)
        conv = qmodel.get_submodule(name)
        out = F.conv2d(layer_input(qmodel, True), conv.quant_weight().value, None, conv.stride, conv.padding)
        errors[method] = (out - target).norm().item()
        assert set(qmodel.state_dict()) == keys  # the float copies GPFQ and Qronos read are gone again
    assert errors["gpfq"] < errors["gptq"] and errors["qronos"] < 0.9 * errors["gptq"], errors


def test_qronos_solves_a_depthwise_layer_with_a_dead_input_channel():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
        nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval()  # fmt: skip
    with torch.no_grad():
        net[0].weight[0] = 0
        net[0].bias[0] = -1  # channel 0 is dead after the ReLU: its depthwise group sees only zeros
    config = BrevitasConfig(w_bits=4, a_bits=8, first_last_bits=None, qronos=True, equalize_iters=0)
    qmodel, _ = build_quant_model(net, config, (3, 16, 16))
    batches = [torch.randn(16, 3, 16, 16)]
    calibrate(qmodel, batches)
    depthwise = next(m for m in qmodel.modules() if getattr(m, "groups", 1) == 8)
    before = depthwise.quant_weight().value.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # Brevitas warns, and skips the layer, when its solve fails
        warnings.filterwarnings("ignore", message=".*(deprecated|fast_hadamard).*")
        optimise_weights(qmodel, batches, "qronos", act_order=True)
    after = depthwise.quant_weight().value.detach()
    assert not torch.equal(before[1:], after[1:])  # the live groups were solved


FAMILIES = [
    "cifar_resnet20",
    "resnet10t",
    "tf_efficientnet_lite0",
    "mobilenetv2_050",
    "mobilenetv3_small_050",
    "regnetx_002",
]


@pytest.mark.parametrize("name", FAMILIES)
def test_timm_families_quantize_calibrate_and_run(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    cfg = resolve_data_config(model)
    if cfg["input_size"][-1] > 64:
        cfg["input_size"] = (3, 64, 64)
    calib = create_calibration_set("gznq", model, cfg, num_images=8, batch_size=8, iterations=2)
    x = calib.images[:4]
    with torch.no_grad():
        ref = model(x)
    for config in (BrevitasConfig(w_bits=8, a_bits=8, calib_batch_size=4), PT2EConfig(calib_batch_size=4)):
        qmodel, report = quantize(model, calib, config)
        with torch.no_grad():
            out = qmodel(x)
        assert isinstance(out, torch.Tensor) and torch.isfinite(out).all()
        assert (out - ref).norm() / ref.norm() < 0.5, (name, report)
        if name == "mobilenetv3_small_050" and isinstance(config, BrevitasConfig):
            assert report["graph"] == "layerwise" and any("failed" in n for n in report["notes"])
        elif isinstance(config, BrevitasConfig):
            assert report["graph"] == "fx", report


@pytest.mark.parametrize("name", FAMILIES)
def test_activation_equalization_keeps_every_family_s_float_function(name):
    from brevitas.graph.quantize import preprocess_for_quantize

    from brevitas_zeroshot.quant._brevitas import _equalize_activations, prepare_for_brevitas

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval() if name != "cifar_resnet20" else random_r20()[0]
    size = (3, 32, 32) if name == "cifar_resnet20" else (3, 64, 64)
    x = torch.randn(8, *size)
    graph = preprocess_for_quantize(prepare_for_brevitas(model, size), merge_bn=True, relu6_to_relu=False)
    equalized, regions = _equalize_activations(graph, [x], 0.5)
    with torch.no_grad():
        want, got = graph(x), equalized(x)
    assert regions > 0 and torch.allclose(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item()), name


def test_unsupported_layers_are_named():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.pair = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Bilinear(4, 4, 2)

        def forward(self, x):
            y = F.relu(self.bn(self.conv(x))).mean((2, 3))
            return self.pair(y, y)

    _, report = build_quant_model(Net().eval(), BrevitasConfig(), (3, 8, 8))
    assert report["float_layers"] == ["pair (Bilinear)"]


@pytest.mark.parametrize("bits", [4, 8])
def test_brevitas_save_reload_is_bit_exact_and_onnx_matches_by_default(resnet20, tmp_path, bits):
    import onnx

    from brevitas_zeroshot.quant._onnx import onnx_session

    model, cfg = resnet20
    calib = create_calibration_set("gaussian", model, cfg, num_images=32)
    config = BrevitasConfig(w_bits=bits, a_bits=bits, reconstruct_iters=20)  # reconstruction (at 4 bits) kept short
    qmodel, report = quantize(model, calib, config)
    save_quantized(
        qmodel, tmp_path, model_name="cifar_resnet20", config=config, data_config=cfg, calib=calib, report=report
    )
    assert report["onnx_parity"]["passed"] and report["onnx_parity"]["images"] == 32 and not report.get("failed_steps")
    again, data_config = load_quantized(tmp_path)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # not the images checked at export
    with torch.no_grad():
        expected = qmodel(x)
        assert torch.equal(again(x), expected)
    assert data_config["input_size"] == (3, 32, 32)
    # onnxruntime with its default optimisations fuses the QDQ pairs into integer kernels: on x86 CPUs without VNNI
    # the u8 x s8 ones saturate (docs/results.md, ONNX); the export's uint8 weights select exact u8 x u8 kernels.
    session = onnx_session(tmp_path / "model.onnx", threads=1)
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])  # one batch: the batch axis is dynamic
    diff = (got - expected).abs()
    assert diff.median() <= 1e-4 * expected.abs().max() and (got.argmax(1) == expected.argmax(1)).sum() >= 15
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    # int8 weights where this CPU has VNNI (exact there, and fast), uint8 + 128 elsewhere (exact u8 x u8 kernels)
    stored = onnx.TensorProto.INT8 if has_int8_dot_product() else onnx.TensorProto.UINT8
    assert report["onnx_weights"] == onnx.TensorProto.DataType.Name(stored).lower()
    weights = [t for t in graph.initializer if t.data_type == stored and len(t.dims) >= 2]
    assert len(weights) == 20  # every conv and the classifier, as 8-bit integers on disk
    inits = {t.name: t for t in graph.initializer}
    zero_points = [inits[n.input[2]].data_type for n in graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and set(zero_points) == {onnx.TensorProto.UINT8}  # signed activations stored as uint8 + 128
    if bits == 8:  # every conv becomes onnxruntime's integer kernel (an int8 activation left one in float)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
        ort.InferenceSession(str(tmp_path / "model.onnx"), options, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(str(tmp_path / "optimised.onnx")).graph.node]
        assert ops.count("QLinearConv") == 19 and "Conv" not in ops, ops


def test_onnx_weights_int8_or_uint8_are_the_same_model(resnet20, tmp_path):
    import onnx

    from brevitas_zeroshot.quant._onnx import export_qcdq, onnx_session

    model, cfg = resnet20
    calib = create_calibration_set("gaussian", model, cfg, num_images=8)
    qmodel, _ = quantize(model, calib, BrevitasConfig(w_bits=8, a_bits=8))
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    outputs = {}
    for int8 in (True, False):
        path = tmp_path / f"int8={int8}.onnx"
        export_qcdq(qmodel, x, path, int8_weights=int8)
        graph = onnx.load(str(path)).graph
        weights = [t.data_type for t in graph.initializer if len(t.dims) >= 2]
        assert weights == [onnx.TensorProto.INT8 if int8 else onnx.TensorProto.UINT8] * 20
        clipped = {n.output[0] for n in graph.node if n.op_type == "Clip"}  # an 8-bit weight's narrow-range clip
        zero_points = [n.input[2] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in clipped]
        assert len(set(zero_points)) == len(zero_points) == 20  # each weight its own: onnxruntime's x64 option needs it
        outputs[int8] = onnx_session(path, threads=1).run(None, {"input": x.numpy()})[0]
    if has_int8_dot_product():  # with VNNI the int8 weights' u8 x s8 kernels are exact too: the same logits
        assert (outputs[True] == outputs[False]).all()


def test_onnx_parity_check_catches_a_wrong_export(resnet20, tmp_path):
    import onnx
    from onnx import numpy_helper

    from brevitas_zeroshot.quant._onnx import onnx_parity

    model, cfg = resnet20
    calib = create_calibration_set("gaussian", model, cfg, num_images=16)
    config = BrevitasConfig(w_bits=8, a_bits=8, onnx_int8_weights=False)  # 255 - w below flips a uint8 weight
    qmodel, report = quantize(model, calib, config)
    save_quantized(
        qmodel, tmp_path, model_name="cifar_resnet20", config=config, data_config=cfg, calib=calib, report=report
    )
    path = tmp_path / "model.onnx"
    assert onnx_parity(qmodel, path, calib.images)["passed"]
    proto = onnx.load(str(path))
    weight = next(t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.UINT8 and t.dims[:1] == [64])
    values = numpy_helper.to_array(weight)
    weight.CopyFrom(numpy_helper.from_array(255 - values, weight.name))  # the signs of one layer's weights flipped
    onnx.save(proto, str(path))
    parity = onnx_parity(qmodel, path, calib.images)
    assert not parity["passed"] and parity["median_abs_diff"] > 0.05 * parity["max_abs_logit"]


def test_pt2e_save_reload_and_bad_quantizer(resnet20, tmp_path):
    model, cfg = resnet20
    with pytest.raises(BzqError, match="must be a torchao"):
        PT2EConfig(quantizer=object())
    with pytest.raises(BzqError, match="8-bit only"):
        PT2EConfig(w_bits=4, a_bits=8)
    calib = create_calibration_set("gaussian", model, cfg, num_images=32)
    config = PT2EConfig()
    qmodel, report = quantize(model, calib, config)
    save_quantized(
        qmodel, tmp_path, model_name="cifar_resnet20", config=config, data_config=cfg, calib=calib, report=report
    )
    again, _ = load_quantized(tmp_path)
    x = calib.images[:5]  # a batch size not seen at export
    again.eval()  # an exported program's eval() returns None
    with torch.no_grad():
        assert torch.equal(again(x), qmodel(x))


def test_model_torch_export_cannot_capture_gets_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y if y.sum() > 0 else -y  # data-dependent control flow

    model = Branchy().eval()
    calib = create_calibration_set("gaussian", model, {"input_size": (3, 8, 8), "mean": (0,) * 3, "std": (1,) * 3}, 4)
    with pytest.raises(BzqError, match="torch.export cannot capture Branchy.*--backend brevitas"):
        quantize(model, calib, PT2EConfig())


def test_mse_activation_ranges_clip_tighter_and_err_less_than_percentiles_at_4_bits():
    model, cfg = random_r20()
    calib = create_calibration_set("gaussian", model, cfg, num_images=64)
    x = torch.cat([images for images, _ in calib.loader(64)])
    with torch.no_grad():
        reference = model.eval()(x)
    results = {}
    for act_range in ("percentile", "mse"):
        qmodel, _ = build_quant_model(model, BrevitasConfig(w_bits=8, a_bits=4, act_range=act_range), (3, 32, 32))
        calibrate(qmodel, calib.loader(32))
        scales = [
            m.scale().item() for name, m in qmodel.named_modules() if name.endswith("act_quant") and m.is_quant_enabled
        ]
        with torch.no_grad():
            error = (_value(qmodel(x)) - reference).pow(2).mean().item()
        results[act_range] = (sum(scales) / len(scales), error)
    assert results["mse"][0] < 0.9 * results["percentile"][0], results  # 4 bits: clip well inside the tail
    assert results["mse"][1] < results["percentile"][1], results
    with pytest.raises(BzqError, match="act_range"):
        BrevitasConfig(act_range="max")


def test_mse_weight_steps_round_every_layer_with_less_error_than_max_steps():
    model, cfg = random_r20()
    errors = {}
    for weight_range in ("max", "mse"):
        qmodel, _ = build_quant_model(model, BrevitasConfig(w_bits=4, weight_range=weight_range), (3, 32, 32))
        errors[weight_range] = {
            name: (m.weight - m.quant_weight().value).pow(2).mean().item()
            for name, m in qmodel.named_modules()
            if hasattr(m, "quant_weight") and m.weight_quant.is_quant_enabled
        }
    assert errors["mse"].keys() == errors["max"].keys() and len(errors["mse"]) == 20
    assert all(errors["mse"][n] <= errors["max"][n] for n in errors["mse"]), errors
    with pytest.raises(BzqError, match="weight_range"):
        BrevitasConfig(weight_range="percentile")


def _reloads_and_exports(qmodel, x, folder, **saved) -> None:
    """Saved and reloaded, ``qmodel`` gives the same outputs bit for bit; its ONNX QCDQ file gives close ones."""
    import onnxruntime as ort

    with torch.no_grad():
        got = _value(qmodel(x))
    save_quantized(qmodel, folder, **{"model_name": "cifar_resnet20", **saved})
    again, _ = load_quantized(folder)
    with torch.no_grad():
        assert torch.equal(_value(again(x)), got)
    session = ort.InferenceSession(str(folder / "model.onnx"))
    onnx = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x[:1].numpy()})[0])
    assert torch.allclose(onnx, got[:1], atol=0.2 * got.abs().max().item()), (onnx, got[:1])


def test_relu6_clips_with_quantization_off_so_the_quantizers_after_it_calibrate_on_clipped_values():
    """Brevitas's 8-bit ReLU6 clipped only through its quantizer's 0..6 range, so calibration (quantization off)
    saw unclipped values: the input quantizer of a Conv2dSame after it (EfficientNet-Lite's stride-2 depthwise
    layers, behind a pad) got a step ~70x too wide and Lite1 W8A8 lost 20 pt."""
    from brevitas.graph.calibrate import quantization_status_manager
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(), Conv2dSame(8, 8, 3, stride=2, groups=8),
        nn.BatchNorm2d(8), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    ).eval()  # fmt: skip
    with torch.no_grad():
        model[0].weight.mul_(30)  # pre-activations far past 6
    x = torch.randn(16, 3, 32, 32)
    assert model[:2](x).max() > 50
    qmodel, report = quantize(model, x, BrevitasConfig(w_bits=8, a_bits=8, bias_correction=False))
    assert report["graph"] == "fx"
    pad_input = qmodel.get_submodule("_3_1_input_quant").act_quant  # the Conv2dSame's, behind its pad
    top = float(pad_input.scale()) * (127 if pad_input.is_signed else 255)
    assert top <= 6.5, top  # calibrated on clipped values (before: 79.8)
    with quantization_status_manager(qmodel, disable_act_quant=True, disable_weight_quant=True,
                                     disable_bias_quant=True, is_training=False):  # fmt: skip
        relu6 = [m for m in qmodel.modules() if type(m).__name__ == "QuantReLU"]
        assert len(relu6) == 2 and all(_value(m(x.new_full((2, 3), 100.0))).max() <= 6.0 for m in relu6)


def test_relu6_gets_a_calibrated_range_keeps_its_clip_and_exports(tmp_path):
    """Brevitas's own ReLU6 quantizer keeps the fixed 0..6 range, whatever the data: at 8 bits MobileNetV2's
    activations (99.99th percentiles mostly 0.56-2.2) got 24-94 of the 256 levels."""
    model = timm.create_model("mobilenetv2_035", pretrained=False).eval()
    cfg = resolve_data_config(model)
    cfg["input_size"] = (3, 64, 64)
    calib = create_calibration_set("gaussian", model, cfg, num_images=16)
    qmodel, report = build_quant_model(model, BrevitasConfig(w_bits=8, a_bits=4), (3, 64, 64))
    relu6 = [m for n, m in qmodel.named_modules() if type(m).__name__ == "QuantReLU"]
    assert report["graph"] == "fx" and report["relu6_calibrated"] == len(relu6) > 10
    calibrate(qmodel, [calib.images])
    ranges = [float(m.act_quant.scale()) * 15 for m in relu6]
    assert max(ranges) <= 6.0 + 1e-5 and min(ranges) < 5.0, ranges  # calibrated, never past the clip at 6
    x = calib.images[:4] * 50  # far outside the calibration range: outputs still clipped at 6
    with torch.no_grad():
        assert all(_value(m(x.new_full((2, 3), 100.0))).max() <= 6.0 + 1e-5 for m in relu6)
    qmodel, report = build_quant_model(model, BrevitasConfig(w_bits=8, a_bits=8), (3, 64, 64))
    assert report["relu6_calibrated"] == len(relu6)
    calibrate(qmodel, [calib.images])
    relu6 = [m for m in qmodel.modules() if type(m).__name__ == "QuantReLU"]
    ranges = [float(m.act_quant.scale()) * 255 for m in relu6]
    assert max(ranges) <= 6.0 + 1e-5 and min(ranges) < 5.0, ranges
    config = BrevitasConfig(w_bits=8, a_bits=4, reconstruct=False)
    qmodel, report = quantize(model, calib, config)
    _reloads_and_exports(qmodel, x, tmp_path, model_name="mobilenetv2_035", config=config, data_config=cfg,
                         calib=calib, report=report)  # fmt: skip


def test_activation_equalization_moves_a_massive_stream_channel_into_the_weights_exactly_and_reloads(
    tmp_path, monkeypatch
):
    """MobileNetV2's stage-5 residual stream carries a few channels 10x past the rest; per-tensor 4-bit steps sized
    for them leave the other channels a few levels. SmoothQuant-style equalization shrinks them, in float exactly."""
    from brevitas.graph.quantize import preprocess_for_quantize

    from brevitas_zeroshot.quant._brevitas import _equalize_activations, prepare_for_brevitas

    torch.manual_seed(0)
    model = timm.create_model("mobilenetv2_035", pretrained=False).eval()
    with torch.no_grad():
        model.blocks[5][0].conv_pwl.weight[3].mul_(40)  # channel 3 of stage 5's residual stream: massive
    cfg = resolve_data_config(model)
    cfg["input_size"] = (3, 64, 64)
    calib = create_calibration_set("gaussian", model, cfg, num_images=16)
    x = calib.images[:8]

    def stream_peaks(net):  # per-channel max |x| of the stream where stage 6 reads it
        seen = []
        hook = net.get_submodule("blocks.6.0.conv_pw").register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        with torch.no_grad():
            out = net(x)
        hook.remove()
        return seen[0].abs().amax((0, 2, 3)), out

    graph = preprocess_for_quantize(prepare_for_brevitas(model, (3, 64, 64)), merge_bn=True, relu6_to_relu=False)
    before, want = stream_peaks(graph)
    equalized, regions = _equalize_activations(graph, [calib.images], 0.5)
    assert regions >= 6  # the residual streams (ReLU6 blocks the rest)
    assert torch.equal(stream_peaks(graph)[0], before)  # on a copy
    after, got = stream_peaks(equalized)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())  # the same function
    spread = lambda p: (p.max() / p.median()).item()  # noqa: E731
    assert spread(before) > 10 and spread(after) < spread(before) / 3, (spread(before), spread(after))

    errors = {}
    for alpha in (0.0, 0.5):  # the first layer's output at a_bits: on this random network, at 8 bits (the default)
        # it alone cuts the output error as much as equalization, and the two together measured worse than either
        config = BrevitasConfig(w_bits=8, a_bits=4, reconstruct=False, act_equalization=alpha, first_output_bits=None)
        qmodel, report = quantize(model, calib, config)
        assert (report.get("act_equalization", 0) >= 6) == (alpha > 0)
        with torch.no_grad():
            errors[alpha] = F.mse_loss(_value(qmodel(x)), model(x)).item()
    assert errors[0.5] < errors[0.0], errors
    _reloads_and_exports(qmodel, x, tmp_path, model_name="mobilenetv2_035", config=config, data_config=cfg,
                         calib=calib, report=report)  # fmt: skip
    config = BrevitasConfig(w_bits=8, a_bits=4, reconstruct=False, act_equalization=0.5, graph="layerwise")
    _, report = quantize(model, calib, config)
    assert "act_equalization" not in report and any("equalization skipped" in n for n in report["notes"])

    def fails(*args, **kwargs):
        raise RuntimeError("a region Brevitas cannot scale")

    monkeypatch.setattr("brevitas.graph.equalize.activation_equalization_mode", fails)
    config = BrevitasConfig(w_bits=8, a_bits=4, reconstruct=False, first_output_bits=None)  # equalization: 0.5
    unequalized, report = quantize(model, calib, config)
    assert "act_equalization" not in report and any("equalization failed (RuntimeError" in n for n in report["notes"])
    with torch.no_grad():
        assert F.mse_loss(_value(unequalized(x)), model(x)).item() == pytest.approx(errors[0.0], rel=1e-4)


@pytest.mark.parametrize("graph,a_bits", [("fx", 8), ("fx", 4), ("layerwise", 8)])
def test_depthwise_bits_apply_to_depthwise_convolutions_only(graph, a_bits):
    """And the first and last layers keep first_last_bits, also in the activation-equalized copy (a_bits 4)."""
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv2_035", pretrained=False).eval()
    config = BrevitasConfig(w_bits=4, a_bits=a_bits, depthwise_bits=8, first_last_bits=6, graph=graph)
    qmodel, report = build_quant_model(model, config, (3, 64, 64), batches=[torch.randn(4, 3, 64, 64)])
    assert report["graph"] == graph and bool(report.get("act_equalization")) == (a_bits < 8)
    assert int(qmodel.conv_stem.quant_weight().bit_width) == int(qmodel.classifier.quant_weight().bit_width) == 6
    bits = {
        n: (m.groups > 1, int(m.quant_weight().bit_width))
        for n, m in qmodel.named_modules()
        if isinstance(m, nn.Conv2d) and hasattr(m, "quant_weight") and n != "conv_stem"
    }
    assert {b for dw, b in bits.values() if dw} == {8} and {b for dw, b in bits.values() if not dw} == {4}
    assert sum(dw for dw, _ in bits.values()) == 17  # every inverted-residual block has one depthwise conv


@pytest.mark.parametrize("graph", ["fx", "layerwise"])
def test_depthwise_weight_range_searches_the_depthwise_steps_only(graph):
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv2_035", pretrained=False).eval()
    config = BrevitasConfig(w_bits=4, a_bits=8, depthwise_weight_range="mse", graph=graph)
    qmodel, report = build_quant_model(model, config, (3, 64, 64))
    assert report["graph"] == graph
    ratios, errors = {True: [], False: []}, []  # step / (largest magnitude / 7), per channel
    for n, m in qmodel.named_modules():
        if isinstance(m, nn.Conv2d) and hasattr(m, "quant_weight") and n != "conv_stem":
            w, q = m.weight.detach(), m.quant_weight()
            at_max = w.abs().flatten(1).amax(1).view(-1, 1, 1, 1) / 7
            ratios[m.groups > 1].append(q.scale.flatten() / at_max.flatten())
            if m.groups > 1:  # the searched steps round with less error than the largest-magnitude ones
                rounded_at_max = (w / at_max).round().clamp(-7, 7) * at_max
                errors.append(((_value(q) - w).norm().item(), (rounded_at_max - w).norm().item()))
    dw, other = torch.cat(ratios[True]), torch.cat(ratios[False])
    assert len(ratios[True]) == 17 and torch.allclose(other, torch.ones_like(other), atol=1e-5)  # max steps kept
    assert (dw < 0.999).float().mean() > 0.25 and dw.max() <= 1 + 1e-5  # searched: often tighter than max
    assert all(searched <= at_max + 1e-6 for searched, at_max in errors)


def test_asymmetric_weights_use_every_level_reload_and_export(tmp_path):
    model, cfg = random_r20()
    errors, levels = {}, {}
    for symmetric in (True, False):
        config = BrevitasConfig(w_bits=2, weight_symmetric=symmetric, weight_range="max")
        qmodel, report = build_quant_model(model, config, (3, 32, 32))
        assert report["graph"] == ("fx" if symmetric else "layerwise")  # graph mode cannot carry zero points
        edge = ("conv1", "linear")
        layers = {n: m for n, m in qmodel.named_modules() if hasattr(m, "quant_weight") and n not in edge}
        errors[symmetric] = {n: (m.weight - m.quant_weight().value).pow(2).mean().item() for n, m in layers.items()}
        levels[symmetric] = {len(m.quant_weight().int()[c].unique()) for m in layers.values() for c in range(4)}
    assert levels[True] <= {1, 2, 3} and 4 in levels[False]  # 2 bits: narrow symmetric is ternary
    assert all(errors[False][n] < errors[True][n] for n in errors[True]), errors

    calib = create_calibration_set("gaussian", model, cfg, num_images=32)
    config = BrevitasConfig(w_bits=2, a_bits=4, reconstruct_iters=5)  # the 2-bit default: asymmetric, mse steps
    qmodel, report = quantize(model, calib, config)
    assert report["weight_grid"] == "asymmetric, mse steps"
    assert (BrevitasConfig(w_bits=3).symmetric_weights, BrevitasConfig(w_bits=3).weight_steps) == (True, "max")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    _reloads_and_exports(qmodel, x, tmp_path, config=config, data_config=cfg, calib=calib, report=report)


@pytest.mark.parametrize("weight_range", ["max", "mse"])
def test_gptq_leaves_asymmetric_weights_on_a_fixed_grid(weight_range):
    # GPTQ rounds column by column and writes the rounded weights back: a zero point recomputed from the weights it
    # is changing would move and take the columns already rounded off the grid.
    model, cfg = random_r20()
    calib = create_calibration_set("gaussian", model, cfg, num_images=32)
    config = BrevitasConfig(w_bits=3, a_bits=8, weight_symmetric=False, weight_range=weight_range)
    qmodel, _ = build_quant_model(model, config, (3, 32, 32))
    calibrate(qmodel, calib.loader(16))
    layers = {n: m for n, m in qmodel.named_modules() if hasattr(m, "quant_weight")}
    zero_points = {n: m.quant_weight().zero_point.clone() for n, m in layers.items()}
    assert optimise_weights(qmodel, calib.loader(16)) > 0.01
    for name, layer in layers.items():
        quant = layer.quant_weight()
        assert torch.equal(quant.zero_point, zero_points[name]), name
        assert torch.allclose(quant.value, layer.weight, atol=1e-6), name  # GPTQ's weights are fixed points


def test_files_without_frozen_weight_zero_points_reload_unchanged(tmp_path):
    from safetensors.torch import load_file, save_file

    model, cfg = random_r20()
    calib = create_calibration_set("gaussian", model, cfg, num_images=16)
    config = BrevitasConfig(w_bits=4, a_bits=8, weight_symmetric=False, gptq=False, reconstruct=False)
    qmodel, report = quantize(model, calib, config)
    out = save_quantized(
        qmodel, tmp_path / "q", model_name="cifar_resnet20", config=config, data_config=cfg, calib=calib,
        report=report, export_onnx=False,
    )  # fmt: skip
    weights = out / "model.safetensors"
    state = load_file(str(weights))
    old = {k: v for k, v in state.items() if not k.endswith("weight_quant.tensor_quant.zero_point_impl.value")}
    assert len(state) - len(old) == 20  # every conv and linear layer's zero point: as files written before
    save_file(old, str(weights))
    reloaded, _ = load_quantized(out)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(_value(reloaded(x)), _value(qmodel(x)))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(a_bits=1),
        dict(w_bits=32),
        dict(graph="onnx"),
        dict(gptq=True, gpfq=True),
        dict(reconstruct_drop=1.0),
        dict(gpfq=True, qronos=True),
        dict(depthwise_weight_range="min"),
        dict(act_equalization=1.5),
        dict(gptq=False, learn_gptq_flips=True),
    ],
)
def test_impossible_brevitas_configs_are_refused(kwargs):
    with pytest.raises(BzqError):
        BrevitasConfig(**kwargs)


@pytest.mark.slow
def test_resnet20_w8a8_synthetic_is_within_one_point_of_float(resnet20, cifar_test_dev, cifar_train_calib):
    model, cfg = resnet20
    test = create_loader(cifar_test_dev, cfg, batch_size=500, workers=0)
    float_top1 = evaluate(model, test)["top1"]
    synthetic = create_calibration_set("gznq", model, cfg, num_images=128)
    for config in (BrevitasConfig(w_bits=8, a_bits=8), PT2EConfig()):
        q, _ = quantize(model, synthetic, config)
        assert evaluate(q, test)["top1"] >= float_top1 - 1.0, config


@pytest.mark.slow
def test_efficientnet_lite0_brevitas_w8a8_keeps_its_predictions(imagenet_sample):
    """Regression: an nn.Identity between BN and ReLU6 made Brevitas requantize pre-activations (61 % vs 89 %)."""
    model, cfg = load_model("tf_efficientnet_lite0")
    calib = create_calibration_set(imagenet_sample, model, cfg, num_images=16, seed=0)
    qmodel, report = quantize(model, calib, BrevitasConfig(w_bits=8, a_bits=8, calib_batch_size=16))
    assert report["graph"] == "fx"
    loader = create_loader(imagenet_sample, cfg, batch_size=50, workers=0, limit=50)
    assert evaluate(qmodel, loader, reference=model)["agreement"] >= 90.0


def test_quantize_takes_any_calibration_data():
    from torch.utils.data import DataLoader, Subset, SubsetRandomSampler

    model, cfg = random_r20()
    calib = create_calibration_set("gaussian", model, cfg, num_images=16)
    sampled = DataLoader(calib, batch_size=4, sampler=SubsetRandomSampler(range(8)))
    assert sum(len(x) for x, _ in sampled) == 8 and Subset(calib, range(4))[0][0].shape == (3, 32, 32)
    config = BrevitasConfig(gptq=False, bias_correction=False)
    reference, _ = quantize(model, calib, config)
    x = calib.images[:4]
    loaders = (DataLoader(calib, batch_size=32), (images for images, _ in calib.loader(32)), [calib.images])
    for data in (*loaders, calib.images):  # a bare (N, C, H, W) tensor is split into batches
        qmodel, _ = quantize(model, data, config)
        assert torch.equal(qmodel(x), reference(x)), type(data)
    with pytest.raises(BzqError, match="empty"):
        quantize(model, [], config)
    with pytest.raises(BzqError, match=r"must be \(N, C, H, W\), not of shape \(3, 32, 32\)"):
        quantize(model, calib.images[0], config)  # one image without its batch dimension


def test_a_third_party_backend_plugs_in(tmp_path):
    from dataclasses import dataclass

    from brevitas_zeroshot.quant import register_backend
    from brevitas_zeroshot.quant._registry import _BACKENDS

    @dataclass
    class HalfConfig:  # weights rounded to fp16, activations in float
        w_bits: int = 16
        a_bits: int = 32

    def half(model, batches, config):
        qmodel = copy.deepcopy(model)
        for p in qmodel.parameters():
            p.data = p.data.half().float()
        return qmodel, {"graph": None, "notes": [f"{len(batches)} batches seen"]}

    def save(qmodel, out, example, report, export_onnx):
        torch.save(qmodel.state_dict(), out / "half.pt")
        return {"weights": "half.pt"}

    def load(folder, meta):
        model, _ = load_model(meta["model"], pretrained=False)
        model.load_state_dict(torch.load(folder / meta["files"]["weights"], weights_only=True))
        return model

    register_backend(HalfConfig, "half", quantize=half, save=save, load=load)
    try:
        model, cfg = random_r20()
        calib = create_calibration_set("gaussian", model, cfg, num_images=8)
        qmodel, report = quantize(model, calib, HalfConfig())
        assert report["notes"] == ["1 batches seen"]
        save_quantized(qmodel, tmp_path, model_name="cifar_resnet20", config=HalfConfig(), data_config=cfg,
                       calib=calib, report=report)  # fmt: skip
        reloaded, _ = load_quantized(tmp_path)
        assert reloaded.bzq_meta["quantization"] == {"backend": "half", "w_bits": 16, "a_bits": 32}
        x = calib.images[:2]
        assert torch.equal(reloaded(x), qmodel.eval()(x))
    finally:
        _BACKENDS.pop(HalfConfig)


@pytest.mark.parametrize("graph", ["fx", "layerwise"])
def test_reconstruction_lowers_block_errors_reloads_and_exports(resnet20, graph, tmp_path):
    import onnxruntime as ort

    model, cfg = resnet20
    calib = create_calibration_set("gaussian", model, cfg, num_images=32)
    config = BrevitasConfig(w_bits=4, a_bits=4, gptq=False, bias_correction=False, graph=graph, reconstruct_iters=100)
    qmodel, report = quantize(model, calib, config)
    units = report["reconstruction"]["units"]
    assert report["graph"] == graph and report["reconstruction"]["mode"] == ("blocks" if graph == "fx" else "layers")
    assert len(units) == (11 if graph == "fx" else 20)  # residual blocks + stem + head; or 19 convs + fc
    assert all(u["mse_after"] <= u["mse_before"] for u in units)  # never worse than round-to-nearest
    learned = [u for u in units if "skipped" not in u]  # all but the 8-bit first and last layers
    assert len(learned) == len(units) - 2
    assert sum(u["mse_after"] for u in learned) < 0.95 * sum(u["mse_before"] for u in learned), units
    assert all(u["seconds"] > 0 for u in learned) and all(u["seconds"] >= 0 for u in units)  # skips take < 5 ms
    assert sum(u["seconds"] for u in units) <= report["reconstruction"]["seconds"]
    plain, _ = quantize(model, calib, BrevitasConfig(**{**config.__dict__, "reconstruct": False}))
    x = calib.images
    with torch.no_grad():
        ref, got, rtn = model(x), qmodel(x), plain(x)
    assert (got - ref).pow(2).mean() < (rtn - ref).pow(2).mean()  # closer to float at the output too

    save_quantized(qmodel, tmp_path, model_name="cifar_resnet20", config=config, data_config=cfg, calib=calib,
                   report=report)  # fmt: skip
    again, _ = load_quantized(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(x), got)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    onnx = torch.cat([torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x[i : i + 1].numpy()})[0])
                      for i in range(8)])  # fmt: skip
    assert (onnx.argmax(1) == got[:8].argmax(1)).float().mean() >= 0.75


def _gptq_4bit_layers(model, batches, keep_unrounded: bool):
    """The 4-bit layers of a W4A4 model after calibration and GPTQ, and their rounded weights."""
    qmodel, _ = build_quant_model(model, BrevitasConfig(w_bits=4, a_bits=4), batches.input_size)
    calibrate(qmodel, batches)
    optimise_weights(qmodel, batches, "gptq", keep_unrounded=keep_unrounded)
    layers = [m for m in qmodel.modules() if hasattr(m, "quant_weight") and m.quant_weight().bit_width == 4]
    return layers, [m.quant_weight().value.detach().clone() for m in layers]


def test_learned_rounding_after_gptq_starts_from_gptq_s_rounding_and_can_go_down_or_up():
    from brevitas_zeroshot.quant._reconstruct import _insert_learned_round, _round_modules
    from brevitas_zeroshot.quant._registry import as_batches

    model, cfg = random_r20()
    batches = as_batches(create_calibration_set("gaussian", model, cfg, num_images=32).images, 32)
    for keep in (False, True):
        layers, rounded = _gptq_4bit_layers(model, batches, keep_unrounded=keep)
        _insert_learned_round(layers)
        assert not any("bzq_unrounded" in m.__dict__ for m in layers)
        rounding = _round_modules(layers)
        with torch.no_grad():
            h = torch.cat([m.train().learned_round_impl(m.value).flatten() for m in rounding])  # soft, in [0, 1]
            for m in rounding:
                m.eval()  # hard: up where h > 0.5
            assert all(torch.equal(m.quant_weight().value, r) for m, r in zip(layers, rounded, strict=True))
        if keep:  # from GPTQ's unrounded weights: about half may round down, half up, as AdaRound from float
            assert 0.3 < (h > 0.5).float().mean() < 0.7 and ((h > 0.05) & (h < 0.95)).float().mean() > 0.8
        else:  # from GPTQ's rounded weights, on the grid: nearly all start at the clamp (and stay there)
            assert (h < 0.01).float().mean() > 0.9
    qmodel, _ = quantize(
        model, batches, BrevitasConfig(w_bits=4, a_bits=4, reconstruct_iters=2, learn_gptq_rounding=True)
    )
    assert not any("bzq_unrounded" in m.__dict__ for m in qmodel.modules())  # used up: the model is as before


def test_learned_rounding_from_gptq_s_choice_can_flip_every_weight_where_the_rounded_weights_are_stuck():
    from brevitas_zeroshot.quant._reconstruct import _insert_learned_round, _round_modules
    from brevitas_zeroshot.quant._registry import as_batches

    model, cfg = random_r20()
    batches = as_batches(create_calibration_set("gaussian", model, cfg, num_images=32).images, 32)
    for flips in (False, True):
        layers, rounded = _gptq_4bit_layers(model, batches, keep_unrounded=flips)
        _insert_learned_round(layers, flips=flips)
        rounding = _round_modules(layers)
        h = [m.train().learned_round_impl(m.value) for m in rounding]
        torch.cat([x.flatten() for x in h]).sum().backward()
        moving = torch.cat([(m.value.grad != 0).flatten() for m in rounding]).float().mean()
        with torch.no_grad():
            for m in rounding:
                m.eval()
            assert all(torch.equal(m.quant_weight().value, r) for m, r in zip(layers, rounded, strict=True))
        if flips:  # every weight starts a hundredth of a step from GPTQ's choice, with a gradient
            soft = torch.cat([x.detach().flatten() for x in h])
            assert moving == 1 and ((soft - 0.01).abs() < 1e-4).logical_or((soft - 0.99).abs() < 1e-4).all()
        else:  # GPTQ's rounded weights sit on the grid, at the clamp of the hard sigmoid: nearly all stuck
            assert moving < 0.1


@pytest.mark.parametrize(
    "kwargs, corrected, flips",
    [
        ({}, False, True),  # the default below 8 bits: flips from GPTQ's choice, no bias correction after them
        ({"reconstruct": False}, True, None),  # nothing fits the blocks: bias correction runs
        ({"learn_gptq_rounding": True, "bias_correction": True}, True, False),
    ],
)
def test_reconstruction_learns_flips_from_gptq_s_choice_and_replaces_bias_correction_by_default(
    monkeypatch, kwargs, corrected, flips
):
    from brevitas_zeroshot.quant import _brevitas
    from brevitas_zeroshot.quant._registry import as_batches

    model, cfg = random_r20()
    batches = as_batches(create_calibration_set("gaussian", model, cfg, num_images=16).images, 16)
    seen = {"corrected": False}
    reconstruct, correct_biases = _brevitas.reconstruct, _brevitas.correct_biases

    def spy_reconstruct(qmodel, batches, settings, reference=None):
        seen["flips"] = settings.gptq_flips
        seen["unrounded"] = sum("bzq_unrounded" in m.__dict__ for m in qmodel.modules())
        return reconstruct(qmodel, batches, settings, reference)

    def spy_correct_biases(qmodel, batches):
        seen["corrected"] = True
        correct_biases(qmodel, batches)

    monkeypatch.setattr(_brevitas, "reconstruct", spy_reconstruct)
    monkeypatch.setattr(_brevitas, "correct_biases", spy_correct_biases)
    _, report = quantize(model, batches, BrevitasConfig(w_bits=4, a_bits=4, reconstruct_iters=2, **kwargs))
    assert report["bias_correction"] is corrected and seen["corrected"] is corrected
    assert seen.get("flips") is flips
    if flips is not None:  # both starts learn from the values GPTQ rounded, kept for them
        assert seen["unrounded"] >= 19 and "reconstruction" in report


@pytest.mark.parametrize("w_bits,a_bits,expected", [(4, 8, True), (8, 4, True), (8, 8, False)])
def test_reconstruction_runs_by_default_below_8_bit_weights_or_activations(w_bits, a_bits, expected):
    from brevitas_zeroshot.quant._registry import as_batches

    model, cfg = random_r20()
    batches = as_batches(create_calibration_set("gaussian", model, cfg, num_images=8).images, 8)
    _, report = quantize(model, batches, BrevitasConfig(w_bits=w_bits, a_bits=a_bits, reconstruct_iters=2))
    assert ("reconstruction" in report) is expected and report["bias_correction"] is not expected


@pytest.mark.parametrize("float_targets", [True, False])
def test_reconstruction_after_gptq_targets_the_float_network_by_default(monkeypatch, float_targets):
    from brevitas.graph.calibrate import quantization_status_manager

    from brevitas_zeroshot.quant import _brevitas

    model, cfg = random_r20()
    calib = create_calibration_set("gaussian", model, cfg, num_images=16)
    reconstruct, seen = _brevitas.reconstruct, {}

    def spy_reconstruct(qmodel, batches, settings, reference=None):
        twin = copy.deepcopy(qmodel if reference is None else reference)  # what reconstruct fits the blocks to
        off = dict(disable_act_quant=True, disable_weight_quant=True, disable_bias_quant=True, is_training=False)
        with quantization_status_manager(twin, **off), torch.no_grad():
            seen["gap"] = (twin(calib.images) - model(calib.images)).abs().max().item()
        return reconstruct(qmodel, batches, settings, reference)

    monkeypatch.setattr(_brevitas, "reconstruct", spy_reconstruct)
    config = BrevitasConfig(w_bits=4, a_bits=4, reconstruct_iters=1)
    assert config.reconstruct_float_targets  # the default
    quantize(model, calib, dataclasses.replace(config, reconstruct_float_targets=float_targets))
    # the float logits (BN merged and equalized: equal up to float rounding), or those of GPTQ's 4-bit weights
    assert (seen["gap"] < 1e-3) is float_targets, seen


def test_reconstruction_with_flip_learns_on_the_mirror_images_too(monkeypatch):
    from brevitas_zeroshot.quant import _reconstruct

    model, cfg = random_r20()
    calib = create_calibration_set("gaussian", model, cfg, num_images=16)
    fit, seen = _reconstruct._fit, {}

    def recording_fit(unit, inputs_q, *args):
        if flip not in seen:  # the first unit's inputs: the images themselves
            seen[flip] = torch.cat(inputs_q)
        return fit(unit, inputs_q, *args)

    monkeypatch.setattr(_reconstruct, "_fit", recording_fit)
    for flip in (False, True):
        config = BrevitasConfig(
            w_bits=4, a_bits=4, reconstruct_iters=1, reconstruct_flip=flip, reconstruct_wide_units=True
        )
        _, report = quantize(model, calib, config)
    assert torch.equal(seen[False], calib.images)
    assert torch.equal(seen[True], torch.cat([calib.images, calib.images.flip(-1)]))
    assert len(report["reconstruction"]["units"]) == 11


def test_reconstruction_logs_a_line_per_unit_where_no_progress_bar_shows(caplog):
    model, cfg = random_r20()
    calib = create_calibration_set("gaussian", model, cfg, num_images=8)
    with caplog.at_level(logging.INFO, logger="brevitas_zeroshot.quant._reconstruct"):
        _, report = quantize(model, calib, BrevitasConfig(w_bits=4, a_bits=4, reconstruct_iters=1))
    lines = [m for m in caplog.messages if m.startswith("reconstruction ")]
    units = report["reconstruction"]["units"]
    assert len(lines) == len(units) == 11  # pytest's stderr is no terminal: the bar is off
    assert lines[0].startswith(f"reconstruction 1/11 {units[0]['unit']}: error ")


def test_reconstruction_decides_the_roundings_of_large_maps_as_of_small_ones():
    """The unit's error is summed over channels and averaged over positions (BRECQ's and QDrop's scale, which AdaRound's
    regulariser weight is set against). Summed over positions as well, the regulariser was H x W times weaker on a
    large map: here 46 % of the first block's roundings were still undecided after 100 steps."""
    model, cfg = random_r20()
    calib = create_calibration_set("gaussian", model, cfg, num_images=32)
    _, report = quantize(model, calib, BrevitasConfig(w_bits=4, a_bits=4, reconstruct_iters=100))
    units = report["reconstruction"]["units"]
    assert all(0 <= u["undecided"] <= 1 for u in units)
    assert max(u["undecided"] for u in units[:7]) < 0.05, units  # the stem and the blocks on 32x32 and 16x16 maps


def test_reconstruction_round_weight_sets_how_firmly_the_roundings_are_decided():
    """AdaRound's regulariser pushes each soft rounding to down or up: without it many stay between the two."""
    model, cfg = random_r20()
    calib = create_calibration_set("gaussian", model, cfg, num_images=16)
    undecided = {}
    for weight in (0.0, 0.1):
        config = BrevitasConfig(w_bits=4, a_bits=4, reconstruct_iters=60, reconstruct_round_weight=weight)
        _, report = quantize(model, calib, config)
        undecided[weight] = sum(u["undecided"] for u in report["reconstruction"]["units"])
    assert undecided[0.1] < 0.5 * undecided[0.0], undecided
    with pytest.raises(BzqError, match="reconstruct_round_weight"):
        BrevitasConfig(reconstruct_round_weight=-1.0)


def test_reconstruction_leaves_units_with_no_quantizer_at_the_model_s_narrowest_width(monkeypatch):
    """At W4A4 the stem (8-bit weights and output) and the classifier (8-bit) keep GPTQ's rounding and their calibrated
    steps unless ``reconstruct_wide_units``; every other unit draws the same batches either way."""
    from brevitas_zeroshot.quant import _reconstruct

    model, cfg = random_r20()
    calib = create_calibration_set("gaussian", model, cfg, num_images=16)
    fit, draws = _reconstruct._fit, {}

    def recording_fit(unit, inputs_q, targets, weights, config, rng, *args):
        draws.setdefault(config.wide_units, {})[unit.name] = rng.getstate()
        return fit(unit, inputs_q, targets, weights, config, rng, *args)

    monkeypatch.setattr(_reconstruct, "_fit", recording_fit)
    base = dict(w_bits=4, a_bits=4, reconstruct_iters=20)
    models, units = {}, {}
    for wide in (False, True):
        models[wide], report = quantize(model, calib, BrevitasConfig(**base, reconstruct_wide_units=wide))
        units[wide] = report["reconstruction"]["units"]
    plain, _ = quantize(model, calib, BrevitasConfig(**base, reconstruct=False, bias_correction=False, act_range="mse"))
    skipped = [u["unit"] for u in units[False] if "skipped" in u]
    assert skipped == [units[False][0]["unit"], units[False][-1]["unit"]] and len(units[False]) == 11
    assert units[False][0]["skipped"] == "no quantizer below 8 bits"
    assert not any("skipped" in u for u in units[True])
    assert set(draws[False]) == set(draws[True]) - set(skipped)
    assert all(draws[False][name] == draws[True][name] for name in draws[False])

    def edges(q):  # the stem's and the classifier's integer weights, the stem output's step
        layers = [m for m in q.modules() if hasattr(m, "quant_weight")]
        return [layers[0].quant_weight().value, layers[-1].quant_weight().value, q.relu.act_quant.scale()]

    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(edges(models[False]), edges(plain), strict=True))
    _, w8a8 = quantize(model, calib, BrevitasConfig(reconstruct=True, reconstruct_iters=2))
    assert not any("skipped" in u for u in w8a8["reconstruction"]["units"])  # nothing narrower anywhere


class _Draws:
    """Stands in for ``random.Random``: ``randrange`` returns the given values in turn."""

    def __init__(self, values):
        self.values = iter(values)

    def randrange(self, lo, hi):
        v = next(self.values)
        assert lo <= v < hi
        return v


def test_reconstruction_windows_compute_exactly_and_estimate_the_whole_error_without_bias():
    from brevitas_zeroshot.quant._reconstruct import _slice, _window

    torch.manual_seed(0)
    unit = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1)).eval()
    x = torch.randn(2, 3, 32, 32)
    window = _window(unit, x, 0.25)
    assert (window.stride, window.side, window.size) == (2, (4, 4), (16, 16)) and window.margin >= 1
    with torch.no_grad():
        full = unit(x)
        n, k = 16, 4
        draws = [(a, b) for a in range(-k + 1, n) for b in range(-k + 1, n)]  # every window, borders included
        estimate = 0.0
        for a, b in draws:
            cut, inner, outer, factor = window.sample(_Draws([a, b]))
            part = unit(_slice(x, *cut))[..., inner[0], inner[1]]
            torch.testing.assert_close(part, full[..., outer[0], outer[1]], rtol=0, atol=1e-5)  # exact
            estimate += factor * full[..., outer[0], outer[1]].pow(2).sum().item()
        assert estimate / len(draws) == pytest.approx(full.pow(2).sum().item(), rel=1e-5)  # unbiased
        window.margin -= 1  # one less and the padding reaches into some window
        cut, inner, outer, _ = window.sample(_Draws([5, 5]))
        assert not torch.allclose(unit(_slice(x, *cut))[..., inner[0], inner[1]], full[..., outer[0], outer[1]])

    class Gated(nn.Module):  # squeeze-excitation: every output depends on the whole image
        def forward(self, x):
            return unit(x) * unit(x).mean((2, 3), keepdim=True).sigmoid()

    assert _window(Gated(), x, 0.25) is None
    assert _window(unit, x, 0.75) is None  # a window as costly as the whole image
    assert _window(unit, x[..., :8, :8], 0.25) is None  # a map too small to cut


def test_reconstruction_on_windows_lowers_block_errors_where_the_maps_are_large(resnet20):
    model, cfg = resnet20
    calib = create_calibration_set("gaussian", model, cfg, num_images=16)
    config = BrevitasConfig(w_bits=4, a_bits=4, gptq=False, bias_correction=False, reconstruct_iters=100,
                            reconstruct_crop=0.5, reconstruct_wide_units=True)  # fmt: skip
    _, report = quantize(model, calib, config)
    units = report["reconstruction"]["units"]
    assert report["reconstruction"]["crop"] == 0.5 and len(units) == 11
    # 32 and 16 px outputs learn on windows of half their side (margin: the padding of two 3x3 convolutions, one
    # for the stem), 8 px ones and the head on whole images
    assert [u.get("window") for u in units] == [[16, 16, 1]] + [[16, 16, 2]] * 3 + [[8, 8, 2]] * 3 + [None] * 4
    assert all(u["mse_after"] <= u["mse_before"] for u in units)
    assert sum(u["mse_after"] for u in units[:7]) < 0.98 * sum(u["mse_before"] for u in units[:7]), units
    with pytest.raises(BzqError, match="reconstruct_crop"):
        BrevitasConfig(reconstruct_crop=1.0)


def test_fisher_weights_follow_what_the_float_network_s_loss_is_sensitive_to():
    from brevitas_zeroshot.quant._reconstruct import _fisher, _Unit

    torch.manual_seed(0)
    first, head = nn.Linear(4, 6), nn.Linear(6, 3)
    with torch.no_grad():
        head.weight[:, 0] = 0  # the first unit's output 0 cannot change the logits
        head.weight[:, 1] *= 10  # output 1 changes them ten times as much as the others
    units = [_Unit("first", first, first, [], set()), _Unit("head", head, head, [], set())]
    images = [torch.randn(64, 4) for _ in range(4)]
    weights = _fisher(units, images, seed=0)
    assert [len(w) for w in weights] == [4, 4] and weights[0][0].shape == (64, 6) and weights[1][0].shape == (64, 3)
    for unit_weights in weights:  # mean 1 per unit: the weighted error keeps the plain one's scale
        assert torch.cat(unit_weights).mean().item() == pytest.approx(1.0, rel=1e-4)
    w = torch.cat(weights[0]).mean(0)
    assert w[0] == 0 and w[1] > 20 * w[2:].max()
    assert torch.equal(torch.cat(_fisher(units, images, seed=0)[0]), torch.cat(weights[0]))  # seeded


def test_reconstruction_with_fisher_weights_lowers_the_weighted_block_errors(resnet20):
    model, cfg = resnet20
    calib = create_calibration_set("gaussian", model, cfg, num_images=16)
    base = dict(w_bits=4, a_bits=4, gptq=False, bias_correction=False, reconstruct_iters=40)
    _, report = quantize(model, calib, BrevitasConfig(**base, reconstruct_fisher=True))
    units = report["reconstruction"]["units"]
    assert report["reconstruction"]["error"] == "fisher" and len(units) == 11
    assert all(u["mse_after"] <= u["mse_before"] for u in units)
    assert sum(u["mse_after"] for u in units) < 0.95 * sum(u["mse_before"] for u in units), units
    _, plain = quantize(model, calib, BrevitasConfig(**base))
    assert plain["reconstruction"]["error"] == "mse"
    assert [u["mse_before"] for u in units] != [u["mse_before"] for u in plain["reconstruction"]["units"]]


def test_learned_weight_steps_move_and_reload(tmp_path):
    from brevitas_zeroshot.quant._reconstruct import _weight_steps

    model, cfg = random_r20()
    calib = create_calibration_set("gaussian", model, cfg, num_images=32)
    # weight steps learn on symmetric grids (4 bits; the 2-bit default is asymmetric, whose steps stay)
    base = dict(w_bits=4, a_bits=4, gptq=False, bias_correction=False, reconstruct_iters=10)
    steps = {}
    for learn in (False, True):
        config = BrevitasConfig(**base, learn_weight_scales=learn)
        qmodel, report = quantize(model, calib, config)
        layers = [m for m in qmodel.modules() if hasattr(m, "quant_weight")]
        steps[learn] = torch.cat([p.detach().flatten() for p in _weight_steps(layers).values()])
    assert steps[False].shape == steps[True].shape
    assert not torch.allclose(steps[False], steps[True])  # the steps were learned...
    assert (steps[True] / steps[False] - 1).abs().max() < 0.5  # ...from the calibrated ones
    save_quantized(qmodel, tmp_path, model_name="cifar_resnet20", config=config, data_config=cfg, calib=calib,
                   report=report)  # fmt: skip
    again, _ = load_quantized(tmp_path)
    x = calib.images[:8]
    with torch.no_grad():
        assert torch.equal(_value(again(x)), _value(qmodel(x)))


def test_learned_weight_steps_move_by_a_fraction_of_themselves_and_keep_the_integers(monkeypatch):
    """Each weight step learns its logarithm (a rate moves every channel's step by the same fraction, however small
    the step), and the integers count from the calibrated step: with the rounding frozen, learning the steps changes
    no integer weight (Brevitas's own floor(w / step) would move those near a boundary)."""
    from brevitas_zeroshot.quant import _reconstruct
    from brevitas_zeroshot.quant._reconstruct import _weight_steps

    model, cfg = random_r20()
    with torch.no_grad():  # BN scales over four orders of magnitude: the folded weight steps over two or more
        bn = model.layer1[0].bn1
        bn.weight.copy_(10 ** torch.linspace(-4, 0, bn.num_features))
    calib = create_calibration_set("gaussian", model, cfg, num_images=8)
    qmodel, _ = build_quant_model(model, BrevitasConfig(w_bits=4, a_bits=4, gptq=False), (3, 32, 32))
    calibrate(qmodel, [calib.images])
    layers = [m for m in qmodel.modules() if hasattr(m, "quant_weight")]
    with torch.no_grad():
        ints = [m.quant_weight().int() for m in layers]
    steps = {k: p.detach().clone() for k, p in _weight_steps(layers).items()}
    spread = torch.cat([p.flatten() for p in steps.values()])
    assert spread.min() < 1e-2 * spread.max()
    errors = iter(range(1000, 0, -1))  # every unit "improves": each keeps what it learned
    monkeypatch.setattr(_reconstruct, "_error", lambda *args: float(next(errors)))
    settings = _reconstruct.ReconstructionConfig(
        iterations=5, round_lr=0.0, learn_scales=False, weight_scale_lr=1e-2, wide_units=True
    )
    _reconstruct.reconstruct(qmodel, [calib.images], settings)
    learned = _weight_steps(layers)
    logs = torch.cat([(learned[k] / steps[k]).log().flatten() for k in steps])
    assert (logs != 0).float().mean() > 0.9  # nearly every step moved...
    assert logs.abs().max() < 5 * 1e-2 * 3.2  # ...by at most what 5 Adam steps of 1e-2 reach on its logarithm
    with torch.no_grad():
        for m, before in zip(layers, ints, strict=True):
            assert torch.equal(m.quant_weight().int(), before)


@pytest.mark.parametrize("learn_weight_scales", [False, True])
def test_a_unit_that_would_get_worse_keeps_its_weights_and_steps(monkeypatch, learn_weight_scales):
    from brevitas_zeroshot.quant import _reconstruct
    from brevitas_zeroshot.quant._reconstruct import _weight_steps

    model, cfg = random_r20()
    calib = create_calibration_set("gaussian", model, cfg, num_images=8)
    config = BrevitasConfig(w_bits=4, a_bits=4, gptq=False, bias_correction=False, graph="layerwise",
                            learn_weight_scales=learn_weight_scales)  # fmt: skip
    qmodel, _ = build_quant_model(model, config, (3, 32, 32))
    calibrate(qmodel, [calib.images])
    layers = [m for m in qmodel.modules() if hasattr(m, "quant_weight")]
    weights = [m.weight.detach().clone() for m in layers]
    steps = {k: p.detach().clone() for k, p in _weight_steps(layers).items()}
    errors = iter(range(1000))  # every unit's error "grows": each one must keep what it had
    monkeypatch.setattr(_reconstruct, "_error", lambda *args: float(next(errors)))
    settings = _reconstruct.ReconstructionConfig(
        iterations=3, weight_scale_lr=1e-2 if learn_weight_scales else 0, wide_units=True
    )
    report = _reconstruct.reconstruct(qmodel, [calib.images], settings)
    assert len(report["units"]) == 20 and all(u["kept_rounding"] for u in report["units"])
    assert all(torch.equal(m.weight, w) for m, w in zip(layers, weights, strict=True))
    assert all(torch.equal(p, steps[k]) for k, p in _weight_steps(layers).items())


def test_qdrop_keeps_float_activations_at_its_rate_only_while_learning():
    import brevitas.nn as qnn
    from brevitas.quant import Uint8ActPerTensorFloat

    from brevitas_zeroshot.quant._reconstruct import _learning

    act = qnn.QuantReLU(act_quant=Uint8ActPerTensorFloat, bit_width=4, return_quant_tensor=True)
    x = torch.randn(20000, generator=torch.Generator().manual_seed(0)) * 2
    act.train()
    for _ in range(40):  # past the statistics collection that sets the step size (as calibration does)
        act(x)
    quantized = _value(act(x)).detach()
    off_grid = quantized != x.relu()  # where quantization changes the value
    with _learning(act, 0.5):
        dropped = _value(act(x)).detach()
        kept_float = (dropped == x.relu())[off_grid].float().mean().item()
        assert 0.45 < kept_float < 0.55  # each element skips quantization with probability 0.5
        assert torch.equal(dropped[~(dropped == x.relu())], quantized[~(dropped == x.relu())])
        act.eval()
        assert torch.equal(_value(act(x)), quantized)  # only while learning
        act.train()
    assert torch.equal(_value(act(x)).detach(), quantized)  # the quantizer is restored
    assert not any(type(m).__name__ == "_Drop" for m in act.modules())


@pytest.mark.parametrize("signed", [False, True])
def test_fused_learning_quantizer_gives_brevitas_values_and_gradients(signed, cpu_kernels):
    import brevitas.nn as qnn
    from brevitas.quant import Int8ActPerTensorFloat, Uint8ActPerTensorFloat

    from brevitas_zeroshot.quant._reconstruct import _learning

    cls, quant = (qnn.QuantIdentity, Int8ActPerTensorFloat) if signed else (qnn.QuantReLU, Uint8ActPerTensorFloat)
    act = cls(act_quant=quant, bit_width=4, return_quant_tensor=True)
    x = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(0)) * 2
    act.train()
    for _ in range(40):  # past the statistics collection that sets the step size (as calibration does)
        act(x)
    (step,) = [p for name, p in act.named_parameters() if name.endswith("value")]
    weights = torch.linspace(-1, 1, x.numel()).view_as(x)

    def run():
        inp = x.clone().requires_grad_(True)
        step.grad = None
        out = _value(act(inp))
        (out * weights).sum().backward()
        return out.detach(), inp.grad, step.grad.clone()

    reference = run()
    with _learning(act):
        assert type(act.act_quant.fused_activation_quant_proxy.tensor_quant).__name__ == "_Fused"
        fused = run()
    assert torch.equal(fused[0], reference[0])  # the same quantized values (ties aside, none here)
    torch.testing.assert_close(fused[1], reference[1])  # straight-through input gradient, 0 where clamped
    torch.testing.assert_close(fused[2], reference[2], rtol=1e-4, atol=1e-5)  # LSQ step-size gradient
    assert fused[1].eq(0).any() and fused[1].ne(0).any()
    assert type(act.act_quant.fused_activation_quant_proxy.tensor_quant).__name__ == "RescalingIntQuant"


@pytest.mark.parametrize("weight_range", ["max", "mse"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fixed_grid_gives_brevitas_s_learned_rounding_values_and_gradients(weight_range, symmetric):
    """While a unit learns, its symmetric weight quantizers run on a grid computed once (_FixedGrid), the others on
    Brevitas's path: either way the quantized weights and the rounding parameters' gradients are Brevitas's own."""
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer as QuantLayer

    from brevitas_zeroshot.quant._reconstruct import _insert_learned_round, _learning, _round_modules

    model, _ = random_r20()
    config = BrevitasConfig(w_bits=4, a_bits=4, weight_range=weight_range, weight_symmetric=symmetric)
    qmodel, _ = build_quant_model(model, config, (3, 32, 32))
    layers = [m for m in qmodel.modules() if isinstance(m, QuantLayer)][1:3]
    _insert_learned_round(layers)
    rounding = _round_modules(layers)
    for p in qmodel.parameters():
        p.requires_grad_(False)
    for m in rounding:
        m.train()
        m.value.requires_grad_(True)
    weights = [torch.randn_like(layer.weight) for layer in layers]

    def run():
        for m in rounding:
            m.value.grad = None
        values = [layer.quant_weight().value for layer in layers]
        sum((v * w).sum() for v, w in zip(values, weights, strict=True)).backward()
        return [v.detach() for v in values], [m.value.grad.clone() for m in rounding]

    reference = run()
    with _learning(qmodel):
        used = [type(layer.weight_quant.tensor_quant).__name__ for layer in layers]
        fixed = run()
    # Asymmetric grids' zero points carry gradients here (the mse search's follows the rounding): Brevitas's path
    assert used == (["_FixedGrid"] * 2 if symmetric else ["RescalingIntQuant"] * 2)
    for a, b in zip(reference[0] + reference[1], fixed[0] + fixed[1], strict=True):
        assert torch.equal(a, b)
    assert all(type(layer.weight_quant.tensor_quant).__name__ == "RescalingIntQuant" for layer in layers)


@pytest.mark.parametrize("lo,hi,zero_point", [(0, 15, 0.0), (-8, 7, 0.0), (0, 255, 37.0)])
def test_fake_quantize_gives_torch_s_values_and_gradients(lo, hi, zero_point, cpu_kernels):
    """Reconstruction's fake quantization (our fused kernel on the CPU, torch's op where it cannot be built) against
    torch's learnable per-tensor op: the same values and input gradient, the step's gradient to summation order; on
    channels-last activations whose gradient comes in another memory order, beyond both ends of the grid."""
    from brevitas_zeroshot.quant import _lsq_cpu

    assert (_lsq_cpu.kernels() is not None) == (cpu_kernels == "cpu_kernels"), "a compiler is here: it must build"
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 48, 13, 11, generator=g) * (hi - lo) / 5).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(4, 48, 13, 11, generator=g)  # contiguous: another memory order than x
    z = torch.tensor([zero_point])

    def run(fn):
        inp, step = x.clone().requires_grad_(), torch.tensor([0.37], requires_grad=True)
        out = fn(inp, step, z, lo, hi)
        out.backward(dy)
        return out.detach(), inp.grad, step.grad, type(out.grad_fn).__name__

    def reference(inp, step, z, lo, hi):
        return torch._fake_quantize_learnable_per_tensor_affine(inp, step, z, lo, hi, 1.0)

    ours, theirs = run(_lsq_cpu.fake_quantize), run(reference)
    assert (ours[3] == "_FakeQuantizeBackward") == (cpu_kernels == "cpu_kernels")  # the kernel ran where built
    assert torch.equal(ours[0], theirs[0])
    assert torch.equal(ours[1], theirs[1])
    assert ours[1].eq(0).any() and ours[1].ne(0).any()  # some clamped, some inside
    torch.testing.assert_close(ours[2], theirs[2], rtol=1e-5, atol=1e-4)


def test_residual_adds_in_float_keep_every_layer_input_quantized_reload_and_export(tmp_path):
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer
    from brevitas.quant_tensor import QuantTensor

    model, cfg = random_r20()
    calib = create_calibration_set("gaussian", model, cfg, num_images=32)
    config = BrevitasConfig(w_bits=4, a_bits=4, quantize_residual_adds=False, reconstruct_iters=5)
    qmodel, report = quantize(model, calib, config)
    assert report["graph"] == "fx" and report["residual_adds_in_float"] == 9  # every residual block of ResNet-20
    seen = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0]))
        for name, m in qmodel.named_modules()
        if isinstance(m, QuantWeightBiasInputOutputLayer)
    ]
    x = calib.images[:8]
    with torch.no_grad():
        qmodel(x)
    for h in hooks:
        h.remove()
    bits = {name: float(t.bit_width) for name, t in seen.items() if isinstance(t, QuantTensor)}
    assert len(seen) == len(bits) == 20, seen.keys()  # every layer still takes quantized input...
    assert bits.pop("conv1") == bits.pop("linear") == 8  # ...at a_bits, but the first and last layers'
    assert bits.pop("layer1.0.conv1") == 8 and set(bits.values()) == {4.0}  # and the first layer's output
    _reloads_and_exports(qmodel, x, tmp_path, config=config, data_config=cfg, calib=calib, report=report)


def test_a_model_saved_before_residual_adds_were_configurable_reloads(tmp_path):
    model, cfg = random_r20()
    calib = create_calibration_set("gaussian", model, cfg, num_images=16)
    config = BrevitasConfig(w_bits=4, a_bits=4, quantize_residual_adds=True, reconstruct=False, gptq=False)
    qmodel, report = quantize(model, calib, config)
    save_quantized(qmodel, tmp_path, model_name="cifar_resnet20", config=config, data_config=cfg, calib=calib,
                   report=report)  # fmt: skip
    record = json.loads((tmp_path / "quant_config.json").read_text())
    del record["quantization"]["quantize_residual_adds"]  # as written by the previous version
    (tmp_path / "quant_config.json").write_text(json.dumps(record))
    again, _ = load_quantized(tmp_path)
    x = calib.images[:4]
    with torch.no_grad():
        assert torch.equal(_value(again(x)), _value(qmodel(x)))


def _input_bits(qmodel, x) -> dict[str, float]:
    """Each quantized layer's input bit width on ``x`` (0 where the input is not a quantized tensor)."""
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer

    seen = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0]))
        for name, m in qmodel.named_modules()
        if isinstance(m, QuantWeightBiasInputOutputLayer)
    ]
    with torch.no_grad():
        qmodel(x)
    for h in hooks:
        h.remove()
    return {name: float(getattr(t, "bit_width", 0)) for name, t in seen.items()}


def test_residual_branches_in_float_keep_every_layer_input_quantized_reload_and_export(tmp_path):
    """Brevitas's graph mode put each inverted residual's branch output (MobileNetV2's linear bottleneck) on the
    stream's quantizer before the add. Below 8-bit activations it now stays in the accumulator domain, as the
    ResNets' add inputs do, and the sum is quantized once; models saved before reload as they were built."""
    import operator

    torch.manual_seed(0)  # unseeded random weights put the 4-bit ONNX output outside its tolerance once in CI
    model = timm.create_model("mobilenetv2_035", pretrained=False).eval()
    cfg = resolve_data_config(model)
    cfg["input_size"] = (3, 64, 64)
    calib = create_calibration_set("gaussian", model, cfg, num_images=16)
    saved = dict(model_name="mobilenetv2_035", data_config=cfg, calib=calib)
    config = BrevitasConfig(w_bits=4, a_bits=4, reconstruct_iters=2)
    qmodel, report = quantize(model, calib, config)
    assert report["graph"] == "fx" and report["residual_adds_in_float"] == 10  # every block with a skip
    adds = [n for n in qmodel.graph.nodes if n.op == "call_function" and n.target in (operator.add, torch.add)]
    assert len(adds) == 10
    for add in adds:
        (branch,) = [a for a in add.args if "drop_path" in str(a.target)]
        assert "conv_pwl" in str(branch.args[0].target)  # the projection's accumulator, no quantizer between
        assert [type(qmodel.get_submodule(u.target)).__name__ for u in add.users] == ["QuantIdentity"]
    x = calib.images[:4]
    bits = _input_bits(qmodel, x)
    assert len(bits) > 50 and bits.pop("conv_stem") == bits.pop("classifier") == 8  # every layer input quantized,
    assert bits.pop("blocks.0.0.conv_dw") == 8  # first_output_bits
    assert set(bits.values()) == {4.0}  # at a_bits
    _reloads_and_exports(qmodel, x, tmp_path / "new", config=config, report=report, **saved)

    config = BrevitasConfig(w_bits=4, a_bits=4, quantize_residual_branches=True, reconstruct=False, gptq=False)
    qmodel, report = quantize(model, calib, config)
    assert report["residual_adds_in_float"] == 0
    save_quantized(qmodel, tmp_path / "old", config=config, report=report, **saved)
    record = json.loads((tmp_path / "old" / "quant_config.json").read_text())
    del record["quantization"]["quantize_residual_branches"]  # as written by the previous version
    (tmp_path / "old" / "quant_config.json").write_text(json.dumps(record))
    again, _ = load_quantized(tmp_path / "old")
    with torch.no_grad():
        assert torch.equal(_value(again(x)), _value(qmodel(x)))


def test_first_last_bits_reach_a_padded_stem_and_first_output_bits_the_second_layer():
    """EfficientNet-Lite's TensorFlow-SAME stem becomes a pad and a convolution, and Brevitas requantizes the padded
    image: at W4A4 the stem took a 4-bit image. ``first_output_bits`` (8 by default, BRECQ's and Genie's convention)
    puts the first layer's output, the second layer's input, at 8 bits, unless every layer takes a_bits."""
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    model = nn.Sequential(
        Conv2dSame(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8),
        nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    ).eval()  # fmt: skip
    x = torch.rand(16, 3, 32, 32)
    layers = ["0.1", "3", "6", "10"]
    for config, bits in [
        (BrevitasConfig(w_bits=4, a_bits=4, reconstruct=False), [8, 8, 4, 8]),
        (BrevitasConfig(w_bits=4, a_bits=4, reconstruct=False, first_output_bits=None), [8, 4, 4, 8]),
        (
            BrevitasConfig(w_bits=4, a_bits=4, reconstruct=False, first_output_bits=None, edge_bits_through_pads=False),
            [4, 4, 4, 8],
        ),
        (BrevitasConfig(w_bits=4, a_bits=4, reconstruct=False, first_last_bits=None), [4, 4, 4, 4]),
        (BrevitasConfig(w_bits=4, a_bits=4, reconstruct=False, first_output_bits=6), [8, 6, 4, 8]),
    ]:
        qmodel, report = quantize(model, x, config)
        assert report["graph"] == "fx"
        assert _input_bits(qmodel, x[:2]) == dict(zip(layers, map(float, bits), strict=True)), config
    relu6 = qmodel.get_submodule(report["first_output"].split()[0])
    assert isinstance(relu6.act_quant.fused_activation_quant_proxy.activation_impl, nn.ReLU6)  # keeps its clip


def test_zero_pads_of_relu_outputs_are_requantized_unsigned(tmp_path):
    """Brevitas requantizes a zero-padded tensor with a signed quantizer, also where the pad's input is a ReLU's
    output (EfficientNet-Lite's stride-2 depthwise convolutions): half its levels unused. Now it is unsigned at the
    same bits; ``unsigned_pads=False`` (models saved before) keeps it signed."""
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(), Conv2dSame(8, 8, 3, stride=2, groups=8),
        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    ).eval()  # fmt: skip
    x = torch.rand(16, 3, 32, 32)
    for unsigned_pads in (True, False):
        config = BrevitasConfig(w_bits=4, a_bits=4, reconstruct=False, unsigned_pads=unsigned_pads)
        qmodel, report = quantize(model, x, config)
        assert report["graph"] == "fx"
        assert report.get("unsigned_pad_requantizers", 0) == unsigned_pads
        seen = []
        hook = qmodel.get_submodule("3.1").register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0]))
        with torch.no_grad():
            qmodel(x)
        hook.remove()
        (t,) = seen
        assert float(t.bit_width) == 4 and bool(t.signed) is not unsigned_pads
        levels = (t.value / t.scale + t.zero_point).round().unique()
        assert levels.min() >= 0
        assert len(levels) > 8 if unsigned_pads else len(levels) <= 8

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    cfg = {**resolve_data_config(model), "input_size": (3, 64, 64)}
    calib = create_calibration_set("gaussian", model, cfg, num_images=8)
    config = BrevitasConfig(w_bits=4, a_bits=4, reconstruct=False, gptq=False)
    qmodel, report = quantize(model, calib, config)
    assert report["graph"] == "fx" and report["unsigned_pad_requantizers"] == 4  # blocks 1.0, 2.0, 3.0 and 5.0
    saved = dict(model_name="tf_efficientnet_lite0", data_config=cfg, calib=calib, config=config, report=report)
    _reloads_and_exports(qmodel, calib.images[:4], tmp_path / "new", **saved)

    config = BrevitasConfig(w_bits=4, a_bits=4, reconstruct=False, gptq=False, unsigned_pads=False)
    qmodel, report = quantize(model, calib, config)
    save_quantized(qmodel, tmp_path / "old", **{**saved, "config": config, "report": report})
    record = json.loads((tmp_path / "old" / "quant_config.json").read_text())
    del record["quantization"]["unsigned_pads"]  # as written by the previous version
    (tmp_path / "old" / "quant_config.json").write_text(json.dumps(record))
    again, _ = load_quantized(tmp_path / "old")
    assert again.get_submodule("blocks_1_0_conv_dw_1_input_quant").act_quant.is_signed
    with torch.no_grad():
        assert torch.equal(_value(again(calib.images[:4])), _value(qmodel(calib.images[:4])))


def test_pt2e_compiled_program_agrees_with_eager_on_this_cpu(resnet20):
    from brevitas_zeroshot._utils import has_int8_dot_product
    from brevitas_zeroshot.quant import lower_quantized

    model, cfg = resnet20
    calib = create_calibration_set("gaussian", model, cfg, num_images=32)
    qmodel, report = quantize(model, calib, PT2EConfig())
    # x86 int8 kernels saturate on the full 0..255 activation range without VNNI: the range is chosen by the CPU
    assert report["activation_range"] == ("0..255" if has_int8_dot_product() else "0..127")
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    compiled, runtime = lower_quantized(qmodel, "pt2e", x)
    if not have_cxx():
        assert runtime.startswith("eager (torch.compile failed")
        pytest.skip("no C++ compiler on PATH: Inductor cannot compile here (the eager fallback was checked)")
    assert runtime == "inductor"
    with torch.no_grad():
        eager, fast = qmodel(x), compiled(x)
    assert (eager.argmax(1) == fast.argmax(1)).float().mean() >= 0.9
    assert (eager - fast).abs().median() <= 0.05 * eager.abs().max()


def test_pt2e_quantizes_convolutions_the_x86_quantizer_does_not_recognise():
    """timm's Conv2dSame (EfficientNet-Lite's stem and stride-2 depthwise layers) has a forward of its own, so
    X86InductorQuantizer, which finds convolutions by their module type, left it float; Inductor must lower it."""
    from timm.layers import Conv2dSame

    from brevitas_zeroshot.quant import lower_quantized
    from brevitas_zeroshot.quant._pt2e import int8_layers

    torch.manual_seed(0)
    model = nn.Sequential(
        Conv2dSame(3, 8, 3, stride=2),
        nn.ReLU6(),
        Conv2dSame(8, 8, 3, stride=2, groups=8),
        nn.Conv2d(8, 16, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()
    x = torch.randn(16, 3, 32, 32)
    qmodel, _ = quantize(model, x, PT2EConfig())
    convs = [n for n in qmodel.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    assert len(convs) == 3
    assert all(n.args[1].target is torch.ops.quantized_decomposed.dequantize_per_channel.default for n in convs)
    assert all(n.args[0].target is torch.ops.quantized_decomposed.dequantize_per_tensor.default for n in convs)
    if not have_cxx():
        pytest.skip("no C++ compiler on PATH: Inductor cannot compile here (the annotation was checked)")
    before = int8_layers()
    _, runtime = lower_quantized(qmodel, "pt2e", x)
    assert runtime == "inductor" and int8_layers() - before == 4  # the three convolutions and the linear layer


def test_a_program_that_cannot_compile_runs_eagerly_and_says_why(monkeypatch, caplog):
    from brevitas_zeroshot.quant import lower_quantized

    model, cfg = random_r20()
    calib = create_calibration_set("gaussian", model, cfg, num_images=8)
    qmodel, _ = quantize(model, calib, PT2EConfig())

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    with caplog.at_level("WARNING"):
        runnable, runtime = lower_quantized(qmodel, "pt2e", calib.images[:4])
    assert runnable is qmodel and runtime == "eager (torch.compile failed: RuntimeError: no C++ compiler found)"
    assert "torch.compile failed" in caplog.text
    assert lower_quantized(qmodel, "brevitas", calib.images[:4]) == (qmodel, "pytorch (eager)")


def test_reconstruction_cuts_a_graph_whose_requantizers_brevitas_shares():
    # MobileNetV2's residual adds: Brevitas registers one requantizer under two names, and a unit's parameters must
    # still be found through both (a KeyError on 'add_N_quant' before; found by `bzq bench zoo`)
    from brevitas_zeroshot import load_model

    model, cfg = load_model("mobilenetv2_035", pretrained=False)
    cfg = {**cfg, "input_size": (3, 32, 32)}
    calib = create_calibration_set("gaussian", model, cfg, num_images=4)
    config = BrevitasConfig(w_bits=4, a_bits=4, gptq=False, reconstruct_iters=1, reconstruct_batch=3)
    _, report = quantize(model, calib, config)
    assert report["graph"] == "fx" and report["reconstruction"]["mode"] == "blocks"
    assert len(report["reconstruction"]["units"]) > 5
    assert (report["reconstruction"]["iterations"], report["reconstruction"]["batch_size"]) == (1, 3)


def test_reconstruction_does_not_cut_the_graph_at_a_split():
    # MixNet's mixed convolutions: torch.split hands a tuple on; a unit must start and end at a tensor (an
    # AttributeError "'tuple' object has no attribute 'detach'" before; found by `bzq bench zoo` on mixnet_s)
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 5, padding=2)
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            x = torch.relu(self.bn(self.stem(x)))
            p, q = torch.split(x, 4, dim=1)
            x = torch.relu(torch.cat([self.a(p), self.b(q)], 1))
            return self.head(x.mean((2, 3)))

    model = Mixed().eval()
    cfg = {"input_size": (3, 16, 16), "mean": (0,) * 3, "std": (1,) * 3}
    calib = create_calibration_set("gaussian", model, cfg, num_images=8)
    _, report = quantize(model, calib, BrevitasConfig(w_bits=4, a_bits=4, first_last_bits=None, reconstruct_iters=2))
    assert report["graph"] == "fx" and report["reconstruction"]["mode"] == "blocks"


def test_a_graph_brevitas_cannot_align_falls_back_to_layerwise_quickly():
    # DLA's tree of residual aggregations: Brevitas's scale-alignment loop never converges (it ran past 240 s in
    # `bzq bench zoo`); capped, it fails fast and the model is quantized layerwise, saying why
    import time

    from brevitas_zeroshot import load_model

    model, cfg = load_model("dla46_c", pretrained=False)
    calib = create_calibration_set("gaussian", model, {**cfg, "input_size": (3, 32, 32)}, num_images=2)
    start = time.perf_counter()
    qmodel, report = quantize(model, calib, BrevitasConfig())
    assert time.perf_counter() - start < 120
    assert report["graph"] == "layerwise" and any("could not find a solution" in n for n in report["notes"])
    with pytest.raises(BzqError, match="Brevitas graph mode cannot quantize"):
        quantize(model, calib, BrevitasConfig(graph="fx"))


def test_a_model_the_pt2e_quantizer_cannot_annotate_gets_one_clear_error():
    # HRNet: X86InductorQuantizer raises "Input partition has more than one output node" (found by `bzq bench zoo`)
    from brevitas_zeroshot import load_model

    model, cfg = load_model("hrnet_w18_small", pretrained=False)
    calib = create_calibration_set("gaussian", model, {**cfg, "input_size": (3, 32, 32)}, num_images=2)
    with pytest.raises(BzqError, match=r"X86InductorQuantizer cannot annotate HighResolutionNet.*--backend brevitas"):
        quantize(model, calib, PT2EConfig())


def test_brevitas_preparation_keeps_every_tensor_on_the_model_device():
    """The BatchNorm and Conv2dSame replacements that make a timm model traceable were built on the CPU: on a CUDA
    model FX tracing then failed and Brevitas fell back to layerwise mode. The meta device stands in for CUDA."""
    from timm.layers import BatchNormAct2d, Conv2dSame

    from brevitas_zeroshot.quant._brevitas import prepare_for_brevitas

    model = nn.Sequential(Conv2dSame(3, 8, 3, stride=2), BatchNormAct2d(8), nn.Conv2d(8, 4, 1)).eval().to("meta")
    prepared = prepare_for_brevitas(model, (3, 32, 32))
    assert not any(isinstance(m, (BatchNormAct2d, Conv2dSame)) for m in prepared.modules())
    assert {t.device.type for t in itertools.chain(prepared.parameters(), prepared.buffers())} == {"meta"}


def test_convolutions_compare_bias_steps_per_channel_with_the_same_outputs(monkeypatch):
    # Brevitas 0.13 compares a convolution's bias step (C,) with its output step (1, C, 1, 1) through a broadcast
    # C x C allclose on every forward; channel_bias_steps makes it the per-channel comparison without changing values
    # (graph mode: layerwise layers have no bias quantizer)
    import brevitas.quant_tensor.int_torch_handler as handler

    from brevitas_zeroshot.quant._brevitas import channel_bias_steps

    model, cfg = random_r20()
    calib = create_calibration_set("gaussian", model, cfg, num_images=4)
    qmodel, _ = quantize(model, calib, BrevitasConfig(w_bits=4, a_bits=8, reconstruct=False))
    table = dict(handler.INT_QUANT_TENSOR_FN_HANDLER)
    compared = []
    allclose = torch.allclose

    def spy(a, b, *args, **kwargs):
        compared.append((a.shape, b.shape, torch.broadcast_shapes(a.shape, b.shape).numel()))
        return allclose(a, b, *args, **kwargs)

    monkeypatch.setattr(handler.torch, "allclose", spy)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = qmodel(x)
        broadcast, compared[:] = list(compared), []
        with channel_bias_steps():
            fast = qmodel(x)
    assert torch.equal(_value(plain), _value(fast))
    assert any(n > 16 * 16 for _, _, n in broadcast)  # what Brevitas does alone: 16 x 16 and more in ResNet-20
    assert compared and all(a.numel() == n and b.numel() == n for a, b, n in compared)
    assert table == handler.INT_QUANT_TENSOR_FN_HANDLER  # Brevitas's own handlers are back
