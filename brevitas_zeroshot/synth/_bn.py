"""BatchNorm statistics: hooks that read each BN layer's input, and the distances to the running statistics."""

import contextlib
import functools
import logging
import types

import torch
from torch import nn

from .._errors import BzqError
from ._bn_cpu import kernels

__all__ = ["BNStatistics", "check_bn_statistics", "find_bn_layers", "profile_set", "BN_LOSSES"]

_logger = logging.getLogger(__name__)

BN_LOSSES = ("kl", "kl_forward", "l2")


def find_bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """BatchNorm layers with running statistics: nn.BatchNorm1d/2d/3d and subclasses (timm's BatchNormAct2d),
    and frozen variants (timm/torchvision FrozenBatchNorm2d) recognised by their buffers."""
    found = []
    for name, m in model.named_modules():
        is_bn = isinstance(m, nn.modules.batchnorm._BatchNorm) or "FrozenBatchNorm" in type(m).__name__
        if is_bn and getattr(m, "running_mean", None) is not None and getattr(m, "running_var", None) is not None:
            found.append((name, m))
    return found


def check_bn_statistics(layers: list[tuple[str, nn.Module]]) -> None:
    """Refuse damaged running statistics (negative or non-finite), naming the layer; say which channels have
    zero variance (dead channels: they carry no distribution to match and are left out of the loss)."""
    dead = []
    for name, m in layers:
        var, mean = m.running_var.detach(), m.running_mean.detach()
        bad = ~torch.isfinite(var) | ~torch.isfinite(mean) | (var < 0)
        if bad.any():
            c = int(bad.nonzero()[0, 0])
            raise BzqError(
                f"BatchNorm layer '{name}' has damaged running statistics (channel {c}: mean {float(mean[c]):.4g}, "
                f"variance {float(var[c]):.4g}; {int(bad.sum())} channel(s) negative or not finite): the checkpoint "
                "is broken, or the model was not trained; load the right weights, or calibrate with --calib DIR."
            )
        if (var == 0).any():
            dead.append(f"{name} ({int((var == 0).sum())})")
    if dead:
        _logger.warning(
            "BatchNorm channels with zero running variance, left out of the BN loss: %s%s",
            ", ".join(dead[:5]),
            f" and {len(dead) - 5} more layers" if len(dead) > 5 else "",
        )


class _Moments(torch.autograd.Function):
    """Per-channel mean and mean square of a channels-first tensor (of each of ``groups`` equal slices of its
    images), with a one-pass backward.

    About 20x cheaper than ``torch.var_mean`` over (N, H, W) forward and backward on CPU: the reductions are
    matrix-vector products over the channels-last layout, and the gradient is one fused multiply-add.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(x)
        return _moments(x, groups)

    @staticmethod
    def backward(ctx, grad_mean: torch.Tensor, grad_sq: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return _moments_grad(x, grad_mean, grad_sq).to(x.dtype), None


class _NormWithMoments(torch.autograd.Function):
    """An eval-mode BatchNorm (``x * scale + shift`` per channel) that also returns the mean and mean square of
    its input (of each of ``groups`` equal slices of its images). ``scale`` and ``shift`` come shaped and cast for
    ``x``. Its backward is one fused pass on the CPU for fp32 or bf16 channels-last activations (``_bn_cpu``), torch
    ops otherwise (BN's own backward alone is slower than them on the CPU)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, groups: int = 1):
        ctx.fused = _fusable(x) if groups == 1 else None
        ctx.save_for_backward(x, scale)
        return (torch.addcmul(shift, x, scale), *_moments(x, groups))

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor, grad_mean: torch.Tensor, grad_sq: torch.Tensor):
        x, scale = ctx.saved_tensors
        if ctx.fused:
            grad_y = grad_y.to(x.dtype).contiguous(memory_format=torch.channels_last)  # copies only if it is not
            grad = ctx.fused.norm_moments_backward(x, grad_y, scale.float().flatten(), grad_mean, grad_sq)
            return grad, None, None, None
        grad = _moments_grad(x, grad_mean, grad_sq)
        return torch.addcmul(grad, grad_y.float(), scale.float()).to(x.dtype), None, None, None


def _fusable(x: torch.Tensor):
    """The fused CPU kernels if they apply to ``x`` (fp32 or bf16, 4-D channels-last, on the CPU, not empty), else
    None."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or x.dim() != 4 or not x.numel():
        return None
    if not x.is_contiguous(memory_format=torch.channels_last):
        return None
    return kernels()


def _moments(x: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and mean square: ``(C,)`` each, or ``(groups, C)`` over equal slices of the images."""
    fused = _fusable(x) if groups == 1 else None
    if fused:
        return tuple(fused.moments(x))
    flat = x.movedim(1, -1).reshape(-1, x.shape[1]).float()  # a view for channels-last activations
    if groups > 1:
        flat = flat.view(groups, -1, x.shape[1])
    weights = flat.new_full((flat.shape[-2],), 1.0 / flat.shape[-2])
    return weights @ flat, weights @ (flat * flat)


def _moments_grad(x: torch.Tensor, grad_mean: torch.Tensor, grad_sq: torch.Tensor) -> torch.Tensor:
    groups = grad_mean.shape[0] if grad_mean.dim() == 2 else 1
    n = x.numel() // x.shape[1] // groups
    shape = (groups, 1, x.shape[1]) + (1,) * (x.dim() - 2)
    xs = x.view(groups, -1, *x.shape[1:]).float()
    return torch.addcmul((grad_mean / n).view(shape), xs, (grad_sq * (2.0 / n)).view(shape)).flatten(0, 1)


def _affine(module: nn.modules.batchnorm._BatchNorm, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode BN as ``x * scale + shift``, shaped and cast for ``like``."""
    scale = torch.rsqrt(module.running_var + module.eps)
    if module.weight is not None:
        scale = scale * module.weight
    shift = -module.running_mean * scale
    if module.bias is not None:
        shift = shift + module.bias
    shape = (1, like.shape[1]) + (1,) * (like.dim() - 2)
    return scale.detach().view(shape).to(like.dtype), shift.detach().view(shape).to(like.dtype)


def _fused_forward(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, stats: "BNStatistics", index: int):
    """Eval-mode forward of a BN layer (timm's BatchNormAct2d included) that also records its input statistics."""
    # The layer is frozen inside the context: its scale and shift are made once per dtype (seven kernel launches per
    # layer and step less; the synthesis step on a GPU is bound by launches).
    key = (index, x.dtype, x.dim())
    if key not in stats._affine:
        stats._affine[key] = _affine(module, x)
    y, mean, sq = _NormWithMoments.apply(x, *stats._affine[key], stats.groups)
    stats._collected[index] = (mean, sq)
    if hasattr(module, "act") and hasattr(module, "drop"):  # timm BatchNormAct2d: norm, then drop, then act
        y = module.act(module.drop(y))
    return y


class BNStatistics:
    """Collects the per-channel mean and variance of every BN layer's input during a forward pass.

    Inside the context, eval-mode BN layers run a fused forward that normalises and measures in one go (other BN
    variants are observed with a forward pre-hook). ``loss()`` then compares the collected batch statistics with the
    running statistics of all layers at once (one vectorised expression, no Python loop over layers). With
    ``groups`` set to G, a pass of G equal groups of images is measured group by group: the moments are
    ``(2, G, channels)`` and ``loss()`` gives each group's loss, so G groups cost one pass's kernel launches.

    Args:
        model: the float model (BN layers intact, eval mode).
        kind: ``"kl"``: per-channel Gaussian KL( N(batch mean, batch var) || N(running mean, running var) );
            ``"kl_forward"``: the other direction, KL( running || batch ), which covers the running distribution;
            ``"l2"``: squared error of the means plus squared error of the standard deviations (ZeroQ/DeepInversion).
        first_layer_weight: weight of the first BN layer relative to the others.
        eps: added to both variances (numerical floor).
    """

    def __init__(self, model: nn.Module, kind: str = "kl", first_layer_weight: float = 1.0, eps: float = 1e-5):
        if kind not in BN_LOSSES:
            raise ValueError(f"BN loss must be one of {BN_LOSSES}, got {kind!r}")
        self.layers = find_bn_layers(model)
        self.kind = kind
        self._collected: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)
        self._handles, self._patched = [], []
        self._affine: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.groups = 1
        if not self.layers:
            return
        mods = [m for _, m in self.layers]
        sizes = [m.running_mean.numel() for m in mods]
        device = mods[0].running_mean.device
        self.sizes = sizes
        self.run_mean = torch.cat([m.running_mean.detach().float() for m in mods])
        self.run_var = torch.cat([m.running_var.detach().float() for m in mods])
        live = self.run_var > 0  # dead (zero-variance) channels have no distribution to match
        self.run_var = self.run_var + eps
        self.eps = eps
        # Each layer weighs the same whatever its width: channel weight = layer weight / channels / layers.
        layer_w = torch.ones(len(mods), device=device)
        layer_w[0] = first_layer_weight
        layer_w = layer_w / layer_w.sum()
        self.layer_index = torch.repeat_interleave(
            torch.arange(len(mods), device=device), torch.tensor(sizes, device=device)
        )
        self.channel_weight = (layer_w / torch.tensor(sizes, device=device, dtype=torch.float))[self.layer_index] * live

    def __enter__(self) -> "BNStatistics":
        self._collected = [None] * len(self.layers)
        self._affine, self.groups = {}, 1
        for index, (_, m) in enumerate(self.layers):
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training:
                m.forward = types.MethodType(functools.partial(_fused_forward, stats=self, index=index), m)
                self._patched.append(m)
            else:  # frozen BN variants, or BN in training mode: observe the input only
                self._handles.append(m.register_forward_pre_hook(functools.partial(self._hook, index=index)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for m in self._patched:
            del m.forward  # back to the class's forward
        self._handles, self._patched = [], []
        self._collected = [None] * len(self.layers)

    def _hook(self, module: nn.Module, args: tuple, index: int) -> None:
        self._collected[index] = _Moments.apply(args[0], self.groups)

    def moments(self) -> torch.Tensor:
        """``(2, channels)`` (``(2, groups, channels)`` with groups): the per-channel mean and mean square of every BN
        layer's input in the last forward pass (all layers concatenated); clears them. Moments of several passes
        average into those of their union (weighted by images), which is how a group larger than one pass is matched
        exactly."""
        missing = [self.layers[i][0] for i, c in enumerate(self._collected) if c is None]
        if missing:
            self._collected = [None] * len(self.layers)
            raise RuntimeError(f"BN layers not called in the last forward: {', '.join(missing[:5])}")
        mean = torch.cat([m for m, _ in self._collected], dim=-1)
        sq = torch.cat([q for _, q in self._collected], dim=-1)
        self._collected = [None] * len(self.layers)
        return torch.stack((mean, sq))

    def channel_loss(self, moments: torch.Tensor | None = None) -> torch.Tensor:
        """Per-channel distance of ``moments`` (default: those of the last forward pass, which are cleared)."""
        mean, sq = self.moments() if moments is None else moments
        var = sq - mean * mean + self.eps
        if self.kind == "kl":
            return 0.5 * (torch.log(self.run_var / var) + (var + (mean - self.run_mean) ** 2) / self.run_var - 1.0)
        if self.kind == "kl_forward":
            return 0.5 * (torch.log(var / self.run_var) + (self.run_var + (mean - self.run_mean) ** 2) / var - 1.0)
        return (mean - self.run_mean) ** 2 + (var.sqrt() - self.run_var.sqrt()) ** 2

    def loss(self, moments: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted mean over layers of the per-layer mean channel distance (of ``moments``, or the last pass): a
        scalar, or one per group with groups."""
        return (self.channel_loss(moments) * self.channel_weight).sum(-1)

    def per_layer(self, channel_loss: torch.Tensor) -> torch.Tensor:
        """Mean channel distance of each layer (for reports, not the hot loop)."""
        sums = torch.zeros(len(self.layers), device=channel_loss.device).index_add_(0, self.layer_index, channel_loss)
        return sums / torch.tensor(self.sizes, device=channel_loss.device, dtype=torch.float)


@torch.no_grad()
def profile_set(
    model: nn.Module, images: torch.Tensor, batch_size: int = 32, reference: torch.Tensor | None = None
) -> dict[str, float]:
    """How the float ``model`` (eval mode) sees a set of normalised ``images``, to compare calibration sources.

    ``bn_loss``: the KL of the set's BN-input statistics, taken over the whole set as one group, to the running
    statistics (what the synthesis minimises, ``BNStatistics.loss``; a synthetic set made in one group gets its
    manifest's ``bn_loss_final``); ``bn_loss_early``/``bn_loss_late``: the mean over the first and the last third of
    the BN layers; ``confidence``: the median of the model's top softmax probability. Images of the training
    distribution match the statistics closely and are classified confidently (docs/results.md). Without BN
    statistics, only ``confidence``.

    With ``reference`` images (real ones, to diagnose a source), also ``coverage``: how well the set's layer-input
    second moments, which GPTQ and reconstruction fit the weights to, span the reference's. Per layer, tr(H⁻¹ R) / d
    with H the set's and R the reference's second moments (each scaled to trace d, H damped by 1 % of its mean
    diagonal as GPTQ damps it), averaged over the convolutions (groups 1) and linear layers of input width ≤
    1,024: below 1 where the set spans every direction the reference uses, more the less it does."""
    device = next(model.parameters()).device
    stats = BNStatistics(model)
    moments, top = [], []
    with stats, _InputMoments(model) if reference is not None else contextlib.nullcontext() as inputs:
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device)
            top.append(model(x).float().softmax(1).amax(1).cpu())
            if stats.layers:
                moments.append(stats.moments() * len(x))
        if reference is not None:
            own = inputs.take()
            for start in range(0, len(reference), batch_size):
                model(reference[start : start + batch_size].to(device))
            covered = [_coverage(h, r) for h, r in zip(own, inputs.take(), strict=True) if _measured(h, r)]
    profile = {"confidence": float(torch.cat(top).median())} if top else {}
    if moments:
        channel = stats.channel_loss(torch.stack(moments).sum(0) / len(images))
        layers, third = stats.per_layer(channel), max(len(stats.layers) // 3, 1)
        profile |= {
            "bn_loss": float((channel * stats.channel_weight).sum()),
            "bn_loss_early": float(layers[:third].mean()),
            "bn_loss_late": float(layers[-third:].mean()),
        }
    if reference is not None and covered:
        profile["coverage"] = sum(covered) / len(covered)
    return profile


class _InputMoments:
    """Hooks summing each eligible layer's input second moments (over images and positions) until ``take``."""

    def __init__(self, model: nn.Module, max_width: int = 1024):
        def width(m):
            return m.in_channels * m.kernel_size[0] * m.kernel_size[1] if isinstance(m, nn.Conv2d) else m.in_features

        self.layers = [
            m
            for m in model.modules()
            if (isinstance(m, nn.Conv2d) and m.groups == 1 or isinstance(m, nn.Linear)) and width(m) <= max_width
        ]
        self.sums: list = [None] * len(self.layers)
        self.counts = [0] * len(self.layers)

    def _hook(self, i: int, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().float()
        # each output position's receptive field is one input vector (a TF-'same' convolution pads inside its forward:
        # its border positions are left out, for every set alike)
        if isinstance(module, nn.Conv2d):
            x = nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
            x = x.transpose(1, 2)
        x = x.reshape(-1, x.shape[-1])
        self.sums[i] = (x.T @ x).double() + (0 if self.sums[i] is None else self.sums[i])
        self.counts[i] += len(x)

    def take(self) -> list:
        """Each layer's mean second moment since the last call (None for a layer that did not run)."""
        taken = [s / c if s is not None else None for s, c in zip(self.sums, self.counts, strict=True)]
        self.sums, self.counts = [None] * len(self.layers), [0] * len(self.layers)
        return taken

    def __enter__(self):
        hooks = [functools.partial(self._hook, i) for i in range(len(self.layers))]
        self.handles = [m.register_forward_pre_hook(h) for m, h in zip(self.layers, hooks, strict=True)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def _measured(h: torch.Tensor | None, r: torch.Tensor | None) -> bool:
    """Whether a layer ran on both sets with some input (a layer whose inputs are all zero spans nothing)."""
    return h is not None and r is not None and h.trace() > 0 and r.trace() > 0


def _coverage(h: torch.Tensor, r: torch.Tensor) -> float:
    d = len(h)
    h, r = h * (d / h.trace()), r * (d / r.trace())
    damped = h + 0.01 * torch.eye(d, dtype=h.dtype, device=h.device)  # the mean diagonal is 1 after scaling
    return float(torch.linalg.solve(damped, r).trace() / d)
