"""Block reconstruction for the Brevitas backend (BRECQ-style), after calibration.

Block by block, in network order, learn (a) each weight's rounding (AdaRound: a soft rounding annealed to hard
decisions, through Brevitas's learned-round quantizer) and (b) the activation quantizers' step sizes (LSQ), so that
the quantized block, fed the quantized network's input to it, reproduces the float block's output on the float
network's input to it. The hard roundings are then written back as the layers' weights and the quantizers restored,
so the model keeps the state dict (and the reload and ONNX paths) of a plain Brevitas model.

Units: in graph (FX) mode the graph is cut where one value carries everything forward (between residual blocks,
around the head), consecutive cuts inside one module block are merged; in layerwise mode each quantized layer is
a unit.
"""

import contextlib
import copy
import logging
import operator
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._utils import keep_freed_memory, progress
from ._lsq_cpu import fake_quantize

__all__ = ["ReconstructionConfig", "reconstruct"]

_logger = logging.getLogger(__name__)


@dataclass
class ReconstructionConfig:
    iterations: int = 1200  # optimisation steps per unit
    batch_size: int = 8  # images per step (more steps of fewer images won at equal cost: docs/method.md)
    round_lr: float = 1e-2
    scale_lr: float = 4e-5  # LSQ step sizes (QDrop's setting)
    round_weight: float = 0.01  # AdaRound's regulariser weight
    learn_scales: bool = True
    weight_scale_lr: float = 0.0  # > 0: also learn the weights' per-channel steps, at this rate on their logarithm
    drop: float = 0.0  # QDrop: while learning, each activation keeps its float value with this probability
    # BRECQ's diagonal Fisher: weigh each output element's squared error by the squared gradient of the float
    # network's loss with respect to it (labels drawn from the float network's own softmax). Graph (block) mode only.
    fisher: bool = False
    flip: bool = False  # also learn on each image's mirror image (twice the images for the same steps)
    # > 0: each step computes a unit on a random window of its input only, and its loss on a window of this fraction
    # of the output's side (exact there: the margin the unit's padding reaches is computed and left out). The loss is
    # still an unbiased estimate of the whole image's; a step costs about the window's area. 0: whole images.
    crop: float = 0.0
    gptq_flips: bool = False  # learned rounding after GPTQ starts at GPTQ's choice (see _insert_learned_round)
    fused: bool = True  # learn through fused fake quantization and fixed weight grids (same values, fewer passes)
    # Also learn units whose every quantizer is wider than the model's narrowest (the 8-bit stem and classifier of a
    # W4A8 model): they gained nothing measurable for 15 % of MobileNetV2's reconstruction time (docs/method.md).
    wide_units: bool = False
    seed: int = 0


def _value(x):
    return x.value if hasattr(x, "value") and not isinstance(x, torch.Tensor) else x


# -- units ------------------------------------------------------------------------------------------------------


class _Unit:
    """A part of the network run on its own: ``q`` (quantized) and ``f`` (float) callables and its layers."""

    def __init__(self, name: str, q: nn.Module, f: nn.Module, layers: list[nn.Module], shared: set[int]):
        self.name, self.q, self.f, self.layers = name, q, f, layers
        self.shared = shared  # ids of parameters also used outside the unit (a quantizer shared across a residual)


def _is_tuple(node) -> bool:
    """Whether an FX node's value is a tuple (``torch.split``, ``chunk``...): all its users take items of it."""
    return bool(node.users) and all(u.op == "call_function" and u.target is operator.getitem for u in node.users)


def _fx_units(qmodel, fmodel) -> list[_Unit] | None:
    """Cut the graph where a single value carries everything forward; None when it cannot be cut into a chain."""
    from brevitas.fx import Graph, GraphModule
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer as QuantLayer

    nodes = list(qmodel.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((position[u] for u in n.users), default=position[n]) for n in nodes}
    modules = dict(qmodel.named_modules(remove_duplicate=False))  # Brevitas shares requantizers between names
    cuts, live = [], set()
    for i, n in enumerate(nodes):  # a cut: the only value defined so far that is still needed is this node's
        if n.op != "get_attr":
            live = {m for m in live | {n} if last_use[m] > i}
        if live == {n} and not _is_tuple(n):  # a unit's input and output are tensors, not a split's parts
            cuts.append(i)
    if nodes[-1].op != "output":
        return None

    def compute(lo: int, hi: int) -> list[str]:
        return [
            str(nodes[j].target)
            for j in range(lo + 1, hi + 1)
            if nodes[j].op == "call_module" and isinstance(modules.get(nodes[j].target), QuantLayer)
        ]

    spans, carry = [], None
    for a, b in zip(cuts, cuts[1:], strict=False):  # a piece without a layer joins the unit before it
        if not compute(a, b):
            if spans:
                spans[-1] = (spans[-1][0], b)
            elif carry is None:
                carry = a
            continue
        spans.append((a if carry is None else carry, b))
        carry = None
    if not spans:
        return None
    spans[-1] = (spans[-1][0], len(nodes) - 2)  # the tail (after the last layer) joins the last unit
    merged = [spans[0]]
    for lo, hi in spans[1:]:  # consecutive cuts inside one module block (a block without a shortcut) join
        prev = compute(*merged[-1])
        if prev and compute(lo, hi) and prev[-1].rsplit(".", 1)[0] == compute(lo, hi)[0].rsplit(".", 1)[0]:
            merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))

    def sub(root, lo: int, hi: int) -> GraphModule:
        graph, env = Graph(), {}
        env[nodes[lo]] = graph.placeholder("x")
        for j in range(lo + 1, hi + 1):
            for arg in nodes[j].all_input_nodes:
                if arg not in env:
                    if arg.op != "get_attr":
                        raise ValueError(f"unit input {arg.name} is not the cut value")
                    env[arg] = graph.node_copy(arg, lambda a: env[a])
            env[nodes[j]] = graph.node_copy(nodes[j], lambda a: env[a])
        graph.output(env[nodes[hi]])
        return GraphModule(root, graph)

    called = [(position[n], n.target) for n in nodes if n.op == "call_module"]
    units = []
    for lo, hi in merged:
        outside = {t for i, t in called if not lo < i <= hi}
        shared = {id(p) for t in outside for p in modules[t].parameters()}
        try:
            layers = [modules[t] for t in compute(lo, hi)]
            name = f"{nodes[lo + 1].name}..{nodes[hi].name}"
            units.append(_Unit(name, sub(qmodel, lo, hi), sub(fmodel, lo, hi), layers, shared))
        except ValueError as e:
            _logger.warning("cannot cut the graph into blocks (%s); reconstructing layer by layer", e)
            return None
    return units


def _layer_units(qmodel, fmodel) -> list[_Unit]:
    """One unit per quantized layer (layerwise mode: each layer quantizes its own input)."""
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer as QuantLayer

    floats = dict(fmodel.named_modules())
    return [_Unit(n, m, floats[n], [m], set()) for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)]


def _widths(module: nn.Module) -> list[int]:
    """The bit widths of the integer quantizers (weights and activations) in ``module``."""
    from brevitas.core.quant import RescalingIntQuant

    return [int(m.msb_clamp_bit_width_impl()) for m in module.modules() if isinstance(m, RescalingIntQuant)]


class _Stop(Exception):
    pass


@torch.no_grad()
def _inputs(model: nn.Module, module: nn.Module, images: list[torch.Tensor]) -> list:
    """What ``module`` receives when ``model`` runs over ``images`` (each forward stops there)."""
    seen = []

    def hook(_, args):
        seen.append(args[0])
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        for x in images:
            with contextlib.suppress(_Stop):
                model(x)
    finally:
        handle.remove()
    return seen


# -- learned rounding and step sizes ------------------------------------------------------------------------------


def _insert_learned_round(layers: list[nn.Module], flips: bool = False) -> list[tuple[nn.Module, object]]:
    """AdaRound quantizers (Brevitas's hard-sigmoid learned round) in ``layers``; returns what to restore.

    A layer that GPTQ rounded learns from the value GPTQ rounded (``bzq_unrounded``, see ``optimise_weights``):
    down or up from there, starting from that value (``flips``: from GPTQ's choice). From its rounded weights alone,
    which sit on the grid, the soft rounding starts at the clamp of its hard sigmoid, where it has no gradient: only
    the few weights that float rounding leaves just off the grid can move (up)."""
    from brevitas.inject.enum import FloatToIntImplType, LearnedRoundImplType

    saved = []
    for layer in layers:
        with torch.no_grad():
            unrounded = layer.__dict__.pop("bzq_unrounded", None)
            up = None if unrounded is None else layer.weight > unrounded  # where GPTQ rounded up
            if unrounded is not None:
                layer.weight.copy_(unrounded)
            ratio = layer.weight / layer.quant_weight().scale
            delta = ratio - torch.floor(ratio)
            if flips and up is not None:  # start at GPTQ's choice, a hundredth of a step inside the clamp
                delta = torch.where(up, 0.99, 0.01).to(delta)
            init = -torch.log((1.1 + 0.1) / (delta + 0.1) - 1)  # h(init) = delta: start from the float weight
        saved.append((layer, layer.weight_quant.quant_injector))
        layer.weight_quant.quant_injector = layer.weight_quant.quant_injector.let(
            float_to_int_impl_type=FloatToIntImplType.LEARNED_ROUND,
            learned_round_impl_type=LearnedRoundImplType.HARD_SIGMOID,
            learned_round_init=init,
            learned_round_zeta=1.1,
            learned_round_gamma=-0.1,
        )
        layer.weight_quant.init_tensor_quant(preserve_state_dict=True)
    return saved


def _weight_steps(layers: list[nn.Module]) -> dict[tuple[int, str], nn.Parameter]:
    """The weights' learnable step sizes (Brevitas's parameter-from-stats scaling) of ``layers``, by position."""
    return {
        (i, name): p
        for i, layer in enumerate(layers)
        for name, p in layer.named_parameters()
        if name.startswith("weight_quant.") and "scaling_impl" in name and name.endswith(".value")
    }


def _round_modules(layers: list[nn.Module]) -> list[nn.Module]:
    from brevitas.core.function_wrapper.learned_round import LearnedRoundSte

    return [m for layer in layers for m in layer.modules() if isinstance(m, LearnedRoundSte)]


@torch.no_grad()
def _bake(saved: list[tuple[nn.Module, object]], values: list[torch.Tensor]) -> None:
    """Write the hard-rounded weights ``values`` back as the weights and restore round-to-nearest quantizers."""
    for (layer, injector), weight in zip(saved, values, strict=True):
        layer.weight.copy_(weight)
        state = {k: v for k, v in layer.weight_quant.state_dict().items() if "float_to_int_impl" not in k}
        layer.weight_quant.quant_injector = injector
        layer.weight_quant.init_tensor_quant(preserve_state_dict=False)
        layer.weight_quant.load_state_dict(state, strict=False)


def _scale_parameters(unit: nn.Module) -> list[nn.Parameter]:
    """The activation quantizers' learnable step sizes in ``unit`` (set by calibration)."""
    return [
        p
        for name, p in unit.named_parameters()
        if "act_quant" in name and "scaling_impl" in name and name.endswith("value")
    ]


class _Fused(nn.Module):
    """Brevitas's per-tensor integer activation quantizer through a fused LSQ kernel, for learning.

    The step size, zero point and bit width come from the wrapped quantizer's own modules (so its parameters are
    the ones learned); quantize-clamp-dequantize and the gradients of input and step size are one kernel instead of
    Brevitas's chain of elementwise passes (torch's, or ours on the CPU: ``_lsq_cpu``). The gradients are the ones
    autograd takes through Brevitas's straight-through rounding and clamp; values can differ from Brevitas's where
    x / step lands within a rounding error of .5, since the kernel multiplies by the inverse step.
    """

    def __init__(self, quant: nn.Module):
        super().__init__()
        self.quant, self.per_channel = quant, False

    def forward(self, x):
        q = self.quant
        if self.per_channel:
            return q(x)
        bit_width = q.msb_clamp_bit_width_impl()
        scale = q.scaling_impl(x, q.int_scaling_impl(bit_width))
        zero_point = q.zero_point_impl(x, scale, bit_width)
        if scale.numel() != 1 or zero_point.numel() != 1:  # per-channel steps: Brevitas's own path from now on
            self.per_channel = True
            return q(x)
        lo, hi = int(q.int_quant.min_int(bit_width)), int(q.int_quant.max_int(bit_width))
        return fake_quantize(x, scale, zero_point, lo, hi), scale, zero_point, bit_width

    @staticmethod
    def fits(quant: nn.Module) -> bool:
        """Whether ``quant`` is a plain integer quantizer (others keep Brevitas's own path)."""
        from brevitas.core.function_wrapper import Identity, RoundSte, TensorClamp
        from brevitas.core.quant import IntQuant, RescalingIntQuant

        if type(quant) is not RescalingIntQuant or type(quant.int_quant) is not IntQuant or quant.observer_only:
            return False
        inner = quant.int_quant
        plain = (RoundSte, TensorClamp, Identity)
        return tuple(map(type, (inner.float_to_int_impl, inner.tensor_clamp_impl, inner.input_view_impl))) == plain


class _FixedGrid(nn.Module):
    """Brevitas's learned-rounding weight quantizer while the rounding (and perhaps the step) learns.

    ``floor(w / step) + zero point`` comes once from the quantizer's own modules, at the calibrated step, so a
    learning step only adds the learned rounding (Brevitas's own module and parameter), clamps and scales, where
    Brevitas recomputes the step from the weights' statistics and rescales every weight each call. Where the step
    learns (Brevitas's parameter ``step``), ``log`` learns its logarithm against the calibrated step, so an update
    moves it by a fraction of itself (with BN folded, one layer's steps span orders of magnitude), and the integers
    still count from the calibrated step: Brevitas's ``floor(w / step)`` would jump by one for every weight on a grid
    point (GPTQ's rounded weights) at the first change of the step; :meth:`write_step` puts the learned step into
    ``step``. Used only where it gives Brevitas's values exactly (checked once; see :func:`_learning`)."""

    def __init__(self, quant: nn.Module, weight: torch.Tensor, step: nn.Parameter | None = None):
        super().__init__()
        self.quant = quant
        with torch.no_grad():
            bit_width = quant.msb_clamp_bit_width_impl()
            scale = quant.scaling_impl(weight, quant.int_scaling_impl(bit_width)).detach()
            zero_point = quant.zero_point_impl(weight, scale, bit_width)
            inner = quant.int_quant
            self.floor = torch.floor(inner.input_view_impl(weight) / scale + zero_point)
            self.lo, self.hi = inner.min_int(bit_width), inner.max_int(bit_width)
        self.scale, self.zero_point, self.bit_width = scale, zero_point, bit_width
        self.step, self.log = step, None if step is None else nn.Parameter(torch.zeros_like(step))

    def forward(self, x):
        inner = self.quant.int_quant
        rnd = inner.float_to_int_impl
        p = rnd.tensor_slicer(rnd.input_view_impl(rnd.learned_round_impl(rnd.value)))
        y = inner.tensor_clamp_impl(self.floor + p, min_val=self.lo, max_val=self.hi)
        scale = self.scale if self.log is None else self.scale * self.log.exp().view_as(self.scale)
        return (y - self.zero_point) * scale, scale, self.zero_point, self.bit_width

    @torch.no_grad()
    def write_step(self) -> None:
        """Put the learned step into Brevitas's step parameter (once, after learning)."""
        self.step.mul_(self.log.exp())

    @classmethod
    def replacing(cls, quant: nn.Module, weight: torch.Tensor) -> "nn.Module":
        """A :class:`_FixedGrid` for ``quant`` where it fits and gives Brevitas's values, else ``quant`` itself."""
        from brevitas.core.function_wrapper.learned_round import LearnedRoundSte
        from brevitas.core.quant import IntQuant, RescalingIntQuant

        plain = type(quant) is RescalingIntQuant and type(quant.int_quant) is IntQuant and not quant.observer_only
        if not plain or not isinstance(quant.int_quant.float_to_int_impl, LearnedRoundSte) or weight.requires_grad:
            return quant
        value, scale, zero_point, _ = quant(weight)
        steps = [p for p in quant.scaling_impl.parameters() if p.requires_grad]
        step = steps[0] if len(steps) == 1 and steps[0].numel() == scale.numel() else None
        if (scale.requires_grad and step is None) or zero_point.requires_grad:
            return quant  # the zero point learns, or the step follows the rounding (asymmetric mse: its search does)
        grid = cls(quant, weight, step if scale.requires_grad else None)
        with torch.no_grad():
            return grid if torch.equal(grid(weight)[0], value) else quant


class _Drop(nn.Module):
    """QDrop around an activation quantizer: in training, each element keeps its float value with probability p."""

    def __init__(self, quant: nn.Module, p: float):
        super().__init__()
        self.quant, self.p = quant, p

    def forward(self, x):
        out = self.quant(x)
        if not self.training:
            return out
        return (torch.where(torch.rand_like(x) < self.p, x, out[0]), *out[1:])


@contextlib.contextmanager
def _learning(unit: nn.Module, drop: float = 0.0, fused: bool = True):
    """For the duration, run the activation quantizers inside ``unit`` through :class:`_Fused` (where they fit)
    and :class:`_Drop` (when ``drop`` > 0), and the weight quantizers through :class:`_FixedGrid` (where they fit);
    Brevitas's quantizers are put back after."""
    from brevitas.proxy.parameter_quant import WeightQuantProxyFromInjector
    from brevitas.proxy.runtime_quant import FusedActivationQuantProxy

    proxies = [m for m in unit.modules() if isinstance(m, FusedActivationQuantProxy | WeightQuantProxyFromInjector)]
    saved = [m.tensor_quant for m in proxies]
    for m in proxies:
        if isinstance(m, WeightQuantProxyFromInjector):
            if fused and len(m.tracked_parameter_list) == 1:
                m.tensor_quant = _FixedGrid.replacing(m.tensor_quant, m.tracked_parameter_list[0])
            continue
        if fused and _Fused.fits(m.tensor_quant):
            m.tensor_quant = _Fused(m.tensor_quant)
        if drop > 0:
            m.tensor_quant = _Drop(m.tensor_quant, drop)
    try:
        yield
    finally:
        for m, quant in zip(proxies, saved, strict=True):
            m.tensor_quant = quant


# -- windows ---------------------------------------------------------------------------------------------------------


def _slice(x, rows: slice, cols: slice):
    """``x[..., rows, cols]`` for a tensor or a Brevitas quant tensor (whose step has no spatial extent)."""
    if isinstance(x, torch.Tensor):
        return x[..., rows, cols]
    return x._replace(value=x.value[..., rows, cols])


@dataclass
class _Window:
    """Random windows of one unit's output for its loss, and the part of its input that computes them exactly."""

    stride: int  # input side / output side
    margin: int  # output positions at a window's edge that the unit's padding reaches (inside the image)
    side: tuple[int, int]  # the loss window's side per axis, in output positions
    size: tuple[int, int]  # the unit's output size

    def sample(self, rng) -> tuple[tuple[slice, slice], tuple[slice, slice], tuple[slice, slice], float]:
        """Input slices, the loss window inside the unit's output on them, the same window in the full output, and
        the factor that makes the window's error sum an unbiased estimate of the whole output's. The window's start
        is drawn from -side + 1 to size - 1 and clipped to the image, so every output position is drawn alike."""
        inputs, inner, outer, factor = [], [], [], 1.0
        for n, k in zip(self.size, self.side, strict=True):
            r = rng.randrange(-k + 1, n)
            lo, hi = max(r, 0), min(r + k, n)
            c0, c1 = max(lo - self.margin, 0), min(hi + self.margin, n)
            inputs.append(slice(c0 * self.stride, c1 * self.stride))
            inner.append(slice(lo - c0, hi - c0))
            outer.append(slice(lo, hi))
            factor *= (n + k - 1) / k
        return tuple(inputs), tuple(inner), tuple(outer), factor


@torch.no_grad()
def _window(unit: nn.Module, x: torch.Tensor, fraction: float) -> _Window | None:
    """How ``unit`` can learn on windows of ``fraction`` of its output's side, or None where it cannot, or where a
    window would cost nearly the whole image. The margin is measured: ``unit`` on the middle half of ``x`` against
    the same part of its output on all of ``x`` (a global operation, such as squeeze-excitation, matches nowhere)."""
    if fraction <= 0:
        return None
    x = _value(x)
    y = _value(unit(x))
    if x.dim() != 4 or y.dim() != 4:
        return None
    (hi_, wi_), (h, w) = x.shape[-2:], y.shape[-2:]
    stride = hi_ // h
    if hi_ != stride * h or wi_ != stride * w:
        return None
    a, b = h // 4, w // 4
    if h - 2 * a < 3 or w - 2 * b < 3:
        return None
    part = _value(unit(x[..., a * stride : (h - a) * stride, b * stride : (w - b) * stride]))
    if part.shape[-2:] != (h - 2 * a, w - 2 * b):
        return None
    off = (part - y[..., a : h - a, b : w - b]).abs().amax(dim=(0, 1)) > 1e-4 * y.abs().max().clamp_min(1e-12)
    margin = next(
        (m for m in range(min(off.shape) // 2) if not off[m : off.shape[0] - m, m : off.shape[1] - m].any()), None
    )
    if margin is None:
        return None
    side = (max(1, round(fraction * h)), max(1, round(fraction * w)))
    if (side[0] + 2 * margin) * (side[1] + 2 * margin) > 0.6 * h * w:
        return None
    return _Window(stride, margin, side, (h, w))


# -- the loop -------------------------------------------------------------------------------------------------------


def _fit(
    unit: _Unit,
    inputs_q: list,
    targets: list[torch.Tensor],
    weights: list | None,
    config: ReconstructionConfig,
    rng,
    bar,
    window: _Window | None = None,
) -> dict:
    """Learn ``unit``'s roundings (and step sizes) so ``unit.q(inputs_q)`` matches ``targets``, each element's squared
    error weighted by ``weights`` where given."""
    scales = [p for p in _scale_parameters(unit.q) if id(p) not in unit.shared] if config.learn_scales else []
    before = _error(unit, inputs_q, targets, weights)  # round to nearest (or GPTQ's rounding)
    kept = [layer.weight for layer in unit.layers] + scales
    snapshot = [p.detach().clone() for p in kept]
    saved = _insert_learned_round(unit.layers, config.gptq_flips)
    rounding = _round_modules(unit.layers)
    groups = [{"params": [m.value for m in rounding], "lr": config.round_lr}]
    if scales:
        groups.append({"params": scales, "lr": config.scale_lr})
    steps = _weight_steps(unit.layers) if config.weight_scale_lr > 0 else {}
    steps_before = {k: p.detach().clone() for k, p in steps.items()}
    learned = [m.value for m in rounding] + scales + list(steps.values())
    frozen = [p for p in unit.q.parameters() if all(p is not q for q in learned)]
    grads = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    for p in learned:
        p.requires_grad_(True)
    warmup, iters = int(0.2 * config.iterations), config.iterations
    # BRECQ's and QDrop's scale, which AdaRound's regulariser weight is set against: each position's error summed over
    # channels, averaged over positions. Summed over positions too, the regulariser was H x W times weaker and the
    # large early units ended with a fifth of their roundings undecided (worse than GPTQ's once hardened).
    positions = targets[0][0, 0].numel()
    unit.q.train()
    for m in rounding:
        m.train()
    with _learning(unit.q, config.drop, config.fused):
        grids = [m for m in unit.q.modules() if isinstance(m, _FixedGrid) and m.log is not None]
        learning = {id(m.step) for m in grids}
        stay = [k for k, p in steps.items() if id(p) not in learning]  # a step learns only on a fixed grid
        for k in stay:
            steps[k].requires_grad_(False)
        if grids:
            groups.append({"params": [m.log for m in grids], "lr": config.weight_scale_lr})
        opt = torch.optim.Adam(groups)
        for step in range(iters):
            i = rng.randrange(len(inputs_q))
            if window is None:
                error, factor = (_value(unit.q(inputs_q[i])) - targets[i]).pow(2), 1.0
                if weights is not None:
                    error = error * weights[i]
            else:
                cut, inner, outer, factor = window.sample(rng)
                error = (
                    _value(unit.q(_slice(inputs_q[i], *cut)))[..., inner[0], inner[1]]
                    - targets[i][..., outer[0], outer[1]]
                ).pow(2)
                if weights is not None:
                    error = error * weights[i][..., outer[0], outer[1]]
            loss = error.flatten(1).sum(1).mean() * factor / positions
            if step >= warmup and rounding:
                beta = 20 - (20 - 2) * (step - warmup) / max(iters - warmup, 1)
                h = _soft(rounding)
                loss = loss + config.round_weight * (1 - (2 * h - 1).abs().pow(beta)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
        with torch.no_grad():  # roundings the annealing left between down and up, which hardening will move
            h = _soft(rounding) if rounding else torch.zeros(0)
            undecided = round(((h > 0.05) & (h < 0.95)).float().mean().nan_to_num().item(), 4)
        unit.q.eval()
        with torch.no_grad():  # the hard roundings, on the grids they learned on
            hard = [layer.quant_weight().value.detach().clone() for layer, _ in saved]
        for m in grids:
            m.write_step()
    _bake(saved, hard)
    for p, g in zip(frozen, grads, strict=True):
        p.requires_grad_(g)
    after = _error(unit, inputs_q, targets, weights)
    entry = {"unit": unit.name, "mse_before": before, "mse_after": after, "undecided": undecided}
    if stay:
        entry["weight_steps_stay"] = len(stay)
    if after > before:  # never worse than round-to-nearest on the calibration images
        with torch.no_grad():
            for p, old in zip(kept, snapshot, strict=True):
                p.copy_(old)
            now = _weight_steps(unit.layers)  # baking made new parameters: found again by name
            for k, old in steps_before.items():
                now[k].copy_(old)
        entry.update(mse_after=before, kept_rounding=True)
    return entry


def _soft(rounding: list[nn.Module]) -> torch.Tensor:
    """The soft roundings (0: down, 1: up) of the learned-round modules, flattened into one tensor."""
    return torch.cat([m.learned_round_impl(m.value).flatten() for m in rounding])


@torch.no_grad()
def _error(unit: _Unit, inputs_q: list, targets: list[torch.Tensor], weights: list | None = None) -> float:
    """Mean squared error of ``unit.q`` against ``targets`` over the calibration images (weighted, if given)."""
    unit.q.eval()
    weights = weights or [1.0] * len(targets)
    total = sum(
        ((_value(unit.q(x)) - t).pow(2) * w).sum().item() for x, t, w in zip(inputs_q, targets, weights, strict=True)
    )
    return total / sum(t.numel() for t in targets)


def _fisher(units: list[_Unit], images: list[torch.Tensor], seed: int) -> list[list[torch.Tensor]]:
    """Per unit and batch, the squared gradient of the float network's cross-entropy with respect to the unit's
    float output, for labels drawn from the network's own softmax (the diagonal Fisher of BRECQ, without labels);
    scaled to mean 1 per unit, so the weighted error stays on the scale of the plain one."""
    gen = torch.Generator().manual_seed(seed)
    squares = [[] for _ in units]
    for x in images:
        outputs, h = [], x.detach().requires_grad_()
        for unit in units:
            h = _value(unit.f(h))
            outputs.append(h)
        labels = torch.multinomial(h.detach().float().softmax(-1).cpu(), 1, generator=gen).squeeze(1).to(h.device)
        grads = torch.autograd.grad(F.cross_entropy(h, labels, reduction="sum"), outputs)
        for square, g in zip(squares, grads, strict=True):
            square.append(g.detach().pow(2))
    for square in squares:
        mean = sum(g.sum() for g in square) / sum(g.numel() for g in square)
        square[:] = [g / mean.clamp_min(1e-30) for g in square]
    return squares


def reconstruct(
    qmodel: nn.Module, batches, config: ReconstructionConfig | None = None, reference: nn.Module | None = None
) -> dict:
    """Reconstruct every unit of the calibrated Brevitas model ``qmodel`` on ``batches``; returns a report.

    The targets are ``qmodel``'s own weights with quantization off, or ``reference``'s (a copy of ``qmodel`` taken
    before GPTQ rounded its weights: the float network's outputs), which this uses up."""
    from brevitas.graph.calibrate import quantization_status_manager

    config = config or ReconstructionConfig()
    device = next(qmodel.parameters()).device
    keep_freed_memory()  # each step reallocates the same activations (at 112 px: 1.3x faster steps on the CPU)
    qmodel.to(memory_format=torch.channels_last)  # faster convolutions (as in synthesis); undone at the end
    fmodel = (copy.deepcopy(qmodel) if reference is None else reference).to(memory_format=torch.channels_last).eval()
    float_mode = quantization_status_manager(fmodel, disable_act_quant=True, disable_weight_quant=True,
                                             disable_bias_quant=True, is_training=False)  # fmt: skip
    float_mode.__enter__()
    try:
        units = _fx_units(qmodel, fmodel) if hasattr(qmodel, "graph") else None
        chained = units is not None  # graph units form a chain: each one's output is the next one's input
        units = units or _layer_units(qmodel, fmodel)
        images = [x.to(device, memory_format=torch.channels_last) for x in _rebatch(batches, config.batch_size)]
        if config.flip:
            images += [x.flip(-1) for x in images]
        xq, xf = images, images
        if config.fisher and not chained:
            _logger.warning("Fisher-weighted reconstruction needs graph (block) mode; layerwise units use plain MSE")
        fisher = _fisher(units, images, config.seed) if config.fisher and chained else [None] * len(units)
        report = {"mode": "blocks" if chained else "layers", "iterations": config.iterations,
                  "batch_size": config.batch_size, "error": "fisher" if fisher[0] is not None else "mse",
                  "crop": config.crop,
                  "units": []}  # fmt: skip
        narrowest = min(_widths(qmodel), default=0)
        widths = [min(_widths(u.q), default=0) for u in units]
        learn = [config.wide_units or w <= narrowest for w in widths]
        bar = progress(total=sum(learn) * config.iterations, desc="reconstruction", unit="it")
        log = _logger.info if bar.disable else _logger.debug  # a line per unit where no bar shows progress
        for i, (unit, weights) in enumerate(zip(units, fisher, strict=True)):
            start = time.perf_counter()
            if not chained:
                xq, xf = _inputs(qmodel, unit.q, images), _inputs(fmodel, unit.f, images)
            with torch.no_grad():
                targets = [_value(unit.f(x)).detach() for x in xf]
            if not learn[i]:
                error = _error(unit, xq, targets, weights)
                report["units"].append({"unit": unit.name, "mse_before": error, "mse_after": error, "undecided": 0.0,
                                        "skipped": f"no quantizer below {widths[i]} bits"})  # fmt: skip
            else:
                window = _window(unit.f, xf[0], config.crop)
                rng = random.Random(f"{config.seed}/{i}")  # a unit's draws do not depend on the units before it
                report["units"].append(_fit(unit, xq, targets, weights, config, rng, bar, window))
                if window is not None:
                    report["units"][-1]["window"] = [*window.side, window.margin]
            if chained:
                with torch.no_grad():
                    xq = [unit.q(x) for x in xq]
                xf = targets
            done = report["units"][-1]
            done["seconds"] = round(time.perf_counter() - start, 2)
            log("reconstruction %d/%d %s: error %.4g -> %.4g (%.0f %% undecided) in %.0f s%s", i + 1, len(units),
                unit.name, done["mse_before"], done["mse_after"], 100 * done["undecided"], done["seconds"],
                f"; skipped: {done['skipped']}" if "skipped" in done else "")  # fmt: skip
        bar.close()
        stay = sum(u.get("weight_steps_stay", 0) for u in report["units"])
        if stay:
            _logger.warning("%d layers kept their weight steps: weight steps learn on symmetric grids only", stay)
    finally:
        float_mode.__exit__(None, None, None)
        qmodel.to(memory_format=torch.contiguous_format)
        for m in qmodel.modules():  # what a failed run left of optimise_weights(keep_unrounded=True)
            m.__dict__.pop("bzq_unrounded", None)
    qmodel.eval()
    return report


def _rebatch(batches, batch_size: int) -> list[torch.Tensor]:
    images = torch.cat(list(batches))
    return list(images.split(batch_size))
