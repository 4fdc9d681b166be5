"""A fused CPU kernel for the per-tensor learnable fake quantization (LSQ) that block reconstruction learns through.

torch's CPU kernels for ``_fake_quantize_learnable_per_tensor_affine`` round element by element through 64-bit
integers: on the development CPU they took 42 % of a MobileNetV2 reconstruction step, 10-100x the time of one
vectorised pass. Here the forward is one pass and the backward one pass (the input's gradient and the step's, summed
in double over blocks), with torch's arithmetic: ``x * (1 / step)``, rounded half to even, so values and gradients
are torch's. ``fake_quantize`` uses torch's op where the kernel does not apply (GPU, other dtypes, strided tensors,
a learned zero point, no compiler).
"""

import functools

import torch

from .._utils import cpu_extension

__all__ = ["fake_quantize"]

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <vector>

// Round half to even in the default rounding mode, vectorisable (std::nearbyint is not, here): exact for |u| < 2^22;
// beyond that the result is still beyond every grid's end, which the clamp then takes.
static inline float round_even(float u) { return (u + 12582912.f) - 12582912.f; }

// x and y: float, dense, in the same memory order; y = (clamp(round(x / s) + z, lo, hi) - z) * s.
torch::Tensor lsq_forward(torch::Tensor x, double scale, double zero_point, int64_t lo, int64_t hi) {
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float s = scale, inv = 1.0f / s, z = zero_point, a = lo, b = hi;
  at::parallel_for(0, x.numel(), 16384, [=](int64_t i0, int64_t i1) {
    const float* __restrict__ xi = xp;
    float* __restrict__ yi = yp;
    for (int64_t i = i0; i < i1; ++i) {
      float q = round_even(xi[i] * inv) + z;
      q = q < a ? a : (q > b ? b : q);
      yi[i] = (q - z) * s;
    }
  });
  return y;
}

// The gradients torch's _fake_quantize_learnable_per_tensor_affine_backward takes (grad_factor 1): dx = dy where x
// rounds inside the grid, else 0; d step = sum of dy * (round(x / s) - x / s) inside, (lo - z) or (hi - z) outside.
std::vector<torch::Tensor> lsq_backward(torch::Tensor x, torch::Tensor dy, double scale, double zero_point,
                                        int64_t lo, int64_t hi) {
  auto dx = torch::empty_like(x);
  const float* __restrict__ xp = x.data_ptr<float>();
  const float* __restrict__ gp = dy.data_ptr<float>();
  float* __restrict__ dp = dx.data_ptr<float>();
  const float inv = 1.0f / static_cast<float>(scale), z = zero_point, a = lo, b = hi;
  const int64_t n = x.numel(), grain = 16384, parts = (n + grain - 1) / grain;
  std::vector<double> sums(parts, 0.0);
  // Written so that the compiler selects rather than branches: with branches, random x cost ~10x (mispredictions).
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float acc = 0.f;
      const int64_t end = std::min(n, (p + 1) * grain);
      for (int64_t i = p * grain; i < end; ++i) {
        const float u = xp[i] * inv, q = round_even(u) + z;
        const bool below = q < a, above = q > b;
        const float d = below ? a - z : (above ? b - z : q - z - u);
        dp[i] = (below || above) ? 0.f : gp[i];
        acc += gp[i] * d;
      }
      sums[p] = acc;
    }
  });
  double total = 0.0;
  for (double v : sums) total += v;
  return {dx, torch::tensor(total, x.options())};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lsq_forward", &lsq_forward);
  m.def("lsq_backward", &lsq_backward);
}
"""


@functools.cache
def kernels():
    """The compiled kernel, or None (``BZQ_NO_CPU_KERNELS=1``, or no compiler): see :func:`cpu_extension`."""
    return cpu_extension("bzq_lsq_cpu", _SOURCE, "fused fake-quantization kernel")


def _dense(x: torch.Tensor) -> bool:
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point: float, lo: int, hi: int, fused):
        ctx.save_for_backward(x, scale)
        ctx.args = (zero_point, lo, hi, fused)
        return fused.lsq_forward(x, scale.item(), zero_point, lo, hi)

    @staticmethod
    def backward(ctx, dy):
        x, scale = ctx.saved_tensors
        zero_point, lo, hi, fused = ctx.args
        if dy.stride() != x.stride():  # the kernel walks both in memory order
            dy = torch.empty_like(x).copy_(dy)
        dx, dscale = fused.lsq_backward(x, dy, scale.item(), zero_point, lo, hi)
        return dx, dscale.reshape(scale.shape).to(scale.dtype), None, None, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``torch._fake_quantize_learnable_per_tensor_affine(x, scale, zero_point, lo, hi, 1.0)``: the same values and
    gradients (to float summation order in the step's), through the fused kernel where it applies."""
    fused, z = None, None
    plain = x.device.type == "cpu" and x.dtype == torch.float32 and scale.numel() == zero_point.numel() == 1
    if plain and _dense(x) and not zero_point.requires_grad:
        z = float(zero_point)
        fused = kernels() if z == round(z) and lo <= z <= hi else None
    if fused is None:
        return torch._fake_quantize_learnable_per_tensor_affine(x, scale.reshape(1), zero_point.reshape(1), lo, hi, 1.0)
    return _FakeQuantize.apply(x, scale, z, lo, hi, fused)
