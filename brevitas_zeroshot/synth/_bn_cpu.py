"""Fused CPU kernels for the BN statistics of the synthesis loop, built once per machine with torch's C++ extension
loader; ``kernels()`` is None where they cannot be built (no compiler), and the loop falls back to plain torch ops.

The moments of an activation take one read of it here (torch ops: a squared copy and two matrix-vector products,
3-6x slower), and the gradient of an eval-mode BN layer that also measured its input one pass (torch: two, about 2x
slower): per-pixel work that costs a large share of a synthesis step at half resolution.
"""

import functools

from .._utils import cpu_extension

__all__ = ["kernels"]

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>

// x: float or bf16 (N, C, H, W) channels-last, in memory M = N*H*W rows of C. Its per-channel mean and mean square
// (float): float sums over blocks of 256 rows, added up in double. (Writing x * scale + shift in the same loop made
// it 3-5x slower than torch's addcmul followed by this.)
template <typename T>
std::vector<torch::Tensor> moments_of(const torch::Tensor& x) {
  const int64_t C = x.size(1), M = x.numel() / C;
  const T* __restrict__ xp = x.data_ptr<T>();
  const int64_t parts = std::min<int64_t>((M + 255) / 256, 4 * at::get_num_threads());
  const int64_t rows = (M + parts - 1) / parts;
  std::vector<double> sums(parts * 2 * C, 0.0);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> s(C), q(C);
    for (int64_t p = p0; p < p1; ++p) {
      double* ps = sums.data() + p * 2 * C;
      double* pq = ps + C;
      const int64_t end = std::min(M, (p + 1) * rows);
      for (int64_t r = p * rows; r < end; r += 256) {
        std::fill(s.begin(), s.end(), 0.f);
        std::fill(q.begin(), q.end(), 0.f);
        float* __restrict__ sp = s.data();
        float* __restrict__ qp = q.data();
        for (int64_t i = r; i < std::min(end, r + 256); ++i) {
          const T* __restrict__ xi = xp + i * C;
          for (int64_t c = 0; c < C; ++c) {
            const float v = static_cast<float>(xi[c]);
            sp[c] += v;
            qp[c] += v * v;
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          ps[c] += sp[c];
          pq[c] += qp[c];
        }
      }
    }
  });
  auto mean = torch::zeros({C}, x.options().dtype(torch::kFloat));
  auto sq = torch::zeros({C}, x.options().dtype(torch::kFloat));
  float* mp = mean.data_ptr<float>();
  float* qp = sq.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    double s = 0, q = 0;
    for (int64_t p = 0; p < parts; ++p) {
      s += sums[p * 2 * C + c];
      q += sums[p * 2 * C + C + c];
    }
    mp[c] = static_cast<float>(s / M);
    qp[c] = static_cast<float>(q / M);
  }
  return {mean, sq};
}

std::vector<torch::Tensor> moments(torch::Tensor x) {
  return x.scalar_type() == at::kBFloat16 ? moments_of<at::BFloat16>(x) : moments_of<float>(x);
}

// The gradient of x through y = x * scale + shift, mean = E[x] and sq = E[x^2] (per channel, over the M rows); x,
// grad_y and the result in x's type (float or bf16), the arithmetic in float.
template <typename T>
torch::Tensor norm_moments_backward_of(const torch::Tensor& x, const torch::Tensor& grad_y, const torch::Tensor& scale,
                                       const torch::Tensor& grad_mean, const torch::Tensor& grad_sq) {
  const int64_t C = x.size(1), M = x.numel() / C;
  auto grad = torch::empty_like(x);
  auto a = (grad_mean / static_cast<double>(M)).contiguous();
  auto b = (grad_sq * (2.0 / static_cast<double>(M))).contiguous();
  const T* __restrict__ xp = x.data_ptr<T>();
  const T* __restrict__ gp = grad_y.data_ptr<T>();
  const float* __restrict__ sc = scale.data_ptr<float>();
  const float* __restrict__ ap = a.data_ptr<float>();
  const float* __restrict__ bp = b.data_ptr<float>();
  T* __restrict__ op = grad.data_ptr<T>();
  at::parallel_for(0, M, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const T* __restrict__ xi = xp + i * C;
      const T* __restrict__ gi = gp + i * C;
      T* __restrict__ oi = op + i * C;
      for (int64_t c = 0; c < C; ++c)
        oi[c] = static_cast<T>(static_cast<float>(gi[c]) * sc[c] + ap[c] + static_cast<float>(xi[c]) * bp[c]);
    }
  });
  return grad;
}

torch::Tensor norm_moments_backward(torch::Tensor x, torch::Tensor grad_y, torch::Tensor scale,
                                    torch::Tensor grad_mean, torch::Tensor grad_sq) {
  return x.scalar_type() == at::kBFloat16 ? norm_moments_backward_of<at::BFloat16>(x, grad_y, scale, grad_mean, grad_sq)
                                          : norm_moments_backward_of<float>(x, grad_y, scale, grad_mean, grad_sq);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("moments", &moments);
  m.def("norm_moments_backward", &norm_moments_backward);
}
"""


@functools.cache
def kernels():
    """The compiled kernels, or None (``BZQ_NO_CPU_KERNELS=1``, or no compiler): see :func:`cpu_extension`."""
    return cpu_extension("bzq_bn_cpu", _SOURCE, "fused BN statistics kernels")
