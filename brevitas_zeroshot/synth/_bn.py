"""BatchNorm statistics: hooks that read each BN layer's input, and the distances to the running statistics."""

import torch
from torch import nn

__all__ = ["BNStatistics", "find_bn_layers", "BN_LOSSES"]

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


class _Moments(torch.autograd.Function):
    """Per-column mean and mean square of a (samples, channels) matrix, with a one-pass backward.

    About 20x cheaper than ``torch.var_mean`` over (N, H, W) forward and backward on CPU: the reductions are
    matrix-vector products over the channels-last layout, and the gradient is one fused multiply-add.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = x.new_full((x.shape[0],), 1.0 / x.shape[0])
        ctx.save_for_backward(x)
        return weights @ x, weights @ (x * x)

    @staticmethod
    def backward(ctx, grad_mean: torch.Tensor, grad_sq: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        n = x.shape[0]
        return torch.addcmul(grad_mean / n, x, grad_sq * (2.0 / n))


class BNStatistics:
    """Collects the per-channel mean and variance of every BN layer's input during a forward pass.

    Use as a context manager around the forward passes; ``loss()`` then compares the collected batch statistics
    with the running statistics of all layers at once (one vectorised expression, no Python loop over layers).

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
        self._collected: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._handles = []
        if not self.layers:
            return
        mods = [m for _, m in self.layers]
        sizes = [m.running_mean.numel() for m in mods]
        device = mods[0].running_mean.device
        self.sizes = sizes
        self.run_mean = torch.cat([m.running_mean.detach().float() for m in mods])
        self.run_var = torch.cat([m.running_var.detach().float() for m in mods]) + eps
        self.eps = eps
        # Each layer weighs the same whatever its width: channel weight = layer weight / channels / layers.
        layer_w = torch.ones(len(mods), device=device)
        layer_w[0] = first_layer_weight
        layer_w = layer_w / layer_w.sum()
        self.layer_index = torch.repeat_interleave(
            torch.arange(len(mods), device=device), torch.tensor(sizes, device=device)
        )
        self.channel_weight = (layer_w / torch.tensor(sizes, device=device, dtype=torch.float))[self.layer_index]

    def __enter__(self) -> "BNStatistics":
        self._handles = [m.register_forward_pre_hook(self._hook) for _, m in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._collected.clear()

    def _hook(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        mean, sq = _Moments.apply(x.movedim(1, -1).reshape(-1, x.shape[1]).float())
        self._collected.append((sq - mean * mean, mean))

    def channel_loss(self) -> torch.Tensor:
        """Per-channel distance for the last forward pass (all layers concatenated); clears the collected stats."""
        if len(self._collected) != len(self.layers):
            got = len(self._collected)
            self._collected.clear()
            raise RuntimeError(f"expected one call of each of {len(self.layers)} BN layers per forward, saw {got}")
        var = torch.cat([v for v, _ in self._collected]) + self.eps
        mean = torch.cat([m for _, m in self._collected])
        self._collected.clear()
        if self.kind == "kl":
            return 0.5 * (torch.log(self.run_var / var) + (var + (mean - self.run_mean) ** 2) / self.run_var - 1.0)
        if self.kind == "kl_forward":
            return 0.5 * (torch.log(var / self.run_var) + (self.run_var + (mean - self.run_mean) ** 2) / var - 1.0)
        return (mean - self.run_mean) ** 2 + (var.sqrt() - self.run_var.sqrt()) ** 2

    def loss(self) -> torch.Tensor:
        """Weighted mean over layers of the per-layer mean channel distance."""
        return (self.channel_loss() * self.channel_weight).sum()

    def per_layer(self, channel_loss: torch.Tensor) -> torch.Tensor:
        """Mean channel distance of each layer (for reports, not the hot loop)."""
        sums = torch.zeros(len(self.layers), device=channel_loss.device).index_add_(0, self.layer_index, channel_loss)
        return sums / torch.tensor(self.sizes, device=channel_loss.device, dtype=torch.float)
