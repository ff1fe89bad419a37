// y = x @ w.T (+ bias) for a few rows of x: the decode step's matrix-vector products.
//
// With one token per sequence, every weight is read once per step and used once, so the product is
// bound by memory bandwidth. Each thread streams a contiguous block of weight rows and takes their
// dot products with every row of x (kept in L1), accumulating in float32. Weights are float32 or
// bfloat16 (raw 16-bit patterns). Built by lucidlm/kernels/build.py with -O3 -march=native; the
// loops are written for the auto-vectoriser.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>

#include "native.h"

namespace {

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float widen(float w) { return w; }
inline float widen(uint16_t w) { return bf16_to_float(w); }

// x rows are float32 here (converted once per call). Four independent 16-lane accumulators: one
// accumulator chain would wait on each FMA's latency and leave the memory bus idle.
template <typename W>
inline float dot(const float* x, const W* w, int64_t k) {
  constexpr int64_t lanes = 16, chains = 4;
  float acc[chains][lanes] = {};
  int64_t i = 0;
  for (; i + chains * lanes <= k; i += chains * lanes)
    for (int64_t c = 0; c < chains; ++c)
#pragma omp simd
      for (int64_t j = 0; j < lanes; ++j) acc[c][j] += x[i + c * lanes + j] * widen(w[i + c * lanes + j]);
  float s = 0.f;
  for (int64_t c = 0; c < chains; ++c)
    for (int64_t j = 0; j < lanes; ++j) s += acc[c][j];
  for (; i < k; ++i) s += x[i] * widen(w[i]);
  return s;
}

// Weight rows [begin, end) on the calling thread.
template <typename W>
void span(const float* x, const W* w, const float* bias, float* y, int64_t m, int64_t n, int64_t k, int64_t begin,
          int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    const float b = bias ? bias[row] : 0.f;
    for (int64_t r = 0; r < m; ++r) y[r * n + row] = dot(x + r * k, w + row * k, k) + b;
  }
}

template <typename W>
void rows_times_x(const float* x, const W* w, const float* bias, float* y, int64_t m, int64_t n, int64_t k) {
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) { span(x, w, bias, y, m, n, k, begin, end); });
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "lucidlm gemv: x (m, k) and weight (n, k) expected, got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "lucidlm gemv: CPU tensors only");
  const int64_t m = x.size(0), n = weight.size(0), k = x.size(1);
  at::Tensor xf = x.to(at::kFloat).contiguous(), w = weight.contiguous();
  at::Tensor bf = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat));
  const float* b = bf.defined() ? bf.data_ptr<float>() : nullptr;
  switch (w.scalar_type()) {
    case at::kFloat:
      rows_times_x(xf.data_ptr<float>(), w.data_ptr<float>(), b, y.data_ptr<float>(), m, n, k);
      break;
    case at::kBFloat16:
      rows_times_x(xf.data_ptr<float>(), reinterpret_cast<const uint16_t*>(w.data_ptr()), b,
                   y.data_ptr<float>(), m, n, k);
      break;
    default:
      TORCH_CHECK(false, "lucidlm gemv: float32 or bfloat16 weights expected, got ", w.scalar_type());
  }
  return y.to(x.scalar_type());
}

}  // namespace

// decode.cpp's native step (native.h): float32 weight rows [begin, end) on the calling thread.
void lucidlm_native::f32_span(const float* x, const float* w, const float* bias, float* y, int64_t m, int64_t n,
                              int64_t k, int64_t begin, int64_t end) {
  span(x, w, bias, y, m, n, k, begin, end);
}

TORCH_LIBRARY(lucidlm_kernels, m) {
  m.def("gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(lucidlm_kernels, CPU, m) { m.impl("gemv", &gemv); }
