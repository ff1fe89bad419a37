// One whole decode step of a Llama-family model in one call: lucidlm's native decoder
// (lucidlm/model/native.py builds the arguments, lucidlm/compiled.py's NativeDecoder calls it).
//
// A decode step on a CPU is bound by the weight bytes it streams; the products run lucidlm's gemv kernels
// (gemv.cpp for float32 weights, qgemv.cpp for int8 / Q8_0 / Q4_0 / Q4_1 blocks; native.h). The whole step
// is ONE OpenMP parallel region: every phase splits its weight rows (or attention heads) across the
// threads and a barrier separates phases, as llama.cpp's graph runner does, instead of one fork/join per
// product (211 per SmolLM2 step). q/k/v share a phase, so do gate/up (SwiGLU is applied by the thread that
// computed both rows), each thread adds its own rows of o/down into the residual, and every thread computes
// the (cheap) RMSNorm of the residual for itself. Everything else of the step (RMSNorm, RoPE with
// cos/sin computed by the caller from its RotaryFrequencies, the write into the dense KV cache, GQA
// softmax attention over the filled slots, SwiGLU, the residuals, the final norm and the lm_head) is
// written out here in float32: in eager PyTorch these small ops cost more than the products
// (about 8 of a 14 ms SmolLM2 step). Same arithmetic as the eager model up to float32 summation order.
//
// Arguments (see native.py, which checks everything before the first call):
//   x        (B, E) float32: the embedded tokens;
//   params   per layer kLayerSlots tensors: attn_norm weight; q, k, v, o as 4 slots each (a, b, c, bias);
//            mlp_norm weight; gate, up, down (4 slots each); k cache, v cache (B, G, cap, D) float32,
//            cache positions (B, cap) int64. Then the final norm's weight and the lm_head (4 slots).
//            A linear's slots: float32 weight (n, k) | int8 qs + scales | uint8 qs + scales + mins?;
//            an absent tensor is an empty one;
//   ints     [n_layer, heads, groups, head_size, rotary dims, interleaved, slot];
//   floats   [attention scale, then one eps per norm: 2 per layer and the final one];
//   cos, sin (B, rotary dims) float32; positions (B,) int64 of the new tokens.
// Returns the logits (B, vocab) float32.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "native.h"

namespace {

constexpr int64_t kLinearSlots = 4;
constexpr int64_t kLayerSlots = 1 + 4 * kLinearSlots + 1 + 3 * kLinearSlots + 3;
constexpr int64_t kRowAlign = 16;  // phase splits fall on multiples of this many weight rows

// One linear layer as the spans read it.
struct Linear {
  enum Kind { kF32, kQ8, kQ4 } kind;
  const void* w = nullptr;  // float32 weight | int8 qs | uint8 qs
  const void* scales = nullptr;
  const void* mins = nullptr;
  at::ScalarType stype = at::kFloat;
  const float* bias = nullptr;
  int64_t n = 0, k = 0, B = 0;
};

Linear describe(const at::Tensor* p, int64_t k, const char* name) {
  const at::Tensor &a = p[0], &b = p[1], &c = p[2], &bias = p[3];
  TORCH_CHECK(a.dim() == 2 && a.is_contiguous(), "lucidlm native_decode: ", name, ": a contiguous 2-d weight expected");
  Linear out;
  out.n = a.size(0);
  out.bias = bias.numel() ? bias.data_ptr<float>() : nullptr;
  TORCH_CHECK(!out.bias || (bias.scalar_type() == at::kFloat && bias.numel() == out.n), "lucidlm native_decode: ",
              name, ": bias float32 (", out.n, ") expected");
  switch (a.scalar_type()) {
    case at::kFloat: out.kind = Linear::kF32, out.k = a.size(1); break;
    case at::kChar:
      out.kind = Linear::kQ8, out.k = a.size(1), out.scales = b.data_ptr(), out.stype = b.scalar_type();
      TORCH_CHECK(b.dim() == 2 && b.size(0) == out.n && b.is_contiguous() && out.k % b.size(1) == 0,
                  "lucidlm native_decode: ", name, ": scales (n, k / B) expected");
      TORCH_CHECK(out.stype == at::kHalf || out.stype == at::kBFloat16 || out.stype == at::kFloat,
                  "lucidlm native_decode: ", name, ": float16, bfloat16 or float32 scales expected");
      out.B = out.k / b.size(1);
      break;
    case at::kByte:
      out.kind = Linear::kQ4, out.k = a.size(1) * 2, out.scales = b.data_ptr(), out.stype = at::kHalf;
      TORCH_CHECK(b.scalar_type() == at::kHalf && b.numel() == out.n * out.k / 32 && b.is_contiguous(),
                  "lucidlm native_decode: ", name, ": float16 scales (n, k / 32) expected");
      out.mins = c.numel() ? c.data_ptr() : nullptr;
      break;
    default: TORCH_CHECK(false, "lucidlm native_decode: ", name, ": unsupported weight storage ", a.scalar_type());
  }
  TORCH_CHECK(out.k == k, "lucidlm native_decode: ", name, ": ", k, " inputs expected, got ", out.k);
  out.w = a.data_ptr();
  return out;
}

// Rows [begin, end) of y (m, n) = x (m, k) W^T + b; xsum: the 4-bit kernels' block sums of x.
void rows(const Linear& l, const float* x, const float* xsum, float* y, int64_t m, int64_t begin, int64_t end) {
  if (begin >= end) return;
  switch (l.kind) {
    case Linear::kF32:
      lucidlm_native::f32_span(x, static_cast<const float*>(l.w), l.bias, y, m, l.n, l.k, begin, end);
      break;
    case Linear::kQ8:
      lucidlm_native::q8_span(x, static_cast<const int8_t*>(l.w), l.scales, l.stype, l.bias, y, m, l.n, l.k, l.B,
                              begin, end);
      break;
    case Linear::kQ4:
      lucidlm_native::q4_span(x, xsum, static_cast<const uint8_t*>(l.w), l.scales, l.mins, l.bias, y, m, l.n, l.k,
                              begin, end);
      break;
  }
}

// This thread's share [begin, end) of `total` items, boundaries on multiples of `align`.
std::pair<int64_t, int64_t> share(int64_t total, int64_t align) {
  const int64_t t = omp_get_thread_num(), threads = omp_get_num_threads();
  const auto edge = [&](int64_t i) { return std::min(total, (total * i / threads + align - 1) / align * align); };
  return {edge(t), edge(t + 1)};
}

// This thread's rows of several products of the same x, the rows of all of them split as one range.
void products(std::initializer_list<std::pair<const Linear*, float*>> jobs, const float* x, const float* xsum,
              int64_t m) {
  int64_t total = 0;
  for (const auto& job : jobs) total += job.first->n;
  const auto [begin, end] = share(total, kRowAlign);
  int64_t offset = 0;
  for (const auto& [l, y] : jobs) {
    rows(*l, x, xsum, y, m, std::clamp(begin - offset, int64_t{0}, l->n), std::clamp(end - offset, int64_t{0}, l->n));
    offset += l->n;
  }
}

// out = weight * x / rms(x) for every row (Llama's RMSNorm in float32), and the 4-bit kernels' block sums.
void rms_norm(const float* x, const float* w, double eps, float* out, float* xsum, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; ++i) ss += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + static_cast<float>(eps));
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[r * n + i] = w[i] * (xr[i] * inv);
  }
  if (n % 32 == 0) lucidlm_native::q4_sums(out, rows, n, xsum);
}

// Rotates the first `dims` values of one head in place: pairs (i, i + dims / 2) (rotate_half) or adjacent pairs
// (interleaved), as apply_rope: v * cos + rotated(v) * sin.
void rope(float* v, int64_t dims, bool interleaved, const float* cos, const float* sin) {
  const int64_t half = dims / 2;
  for (int64_t j = 0; j < half; ++j) {
    const int64_t i0 = interleaved ? 2 * j : j, i1 = interleaved ? 2 * j + 1 : j + half;
    const float a = v[i0], b = v[i1];
    v[i0] = a * cos[i0] - b * sin[i0];
    v[i1] = b * cos[i1] + a * sin[i1];
  }
}

#ifdef __AVX512F__
// e^x for 16 lanes, x <= 0 (a softmax's shifted logits): Cephes' expf (range reduction by ln 2, a degree-5
// polynomial on [-ln2/2, ln2/2], 2^n by vscalefps), within 2 ulp of std::exp; the scalar exp per key cost
// more than the rest of a decode step's attention.
inline __m512 exp_le0(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-103.f));  // e^-103 underflows to 0 in float32 either way
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}
#endif

// w[t] = e^(w[t] - top), 0 where w[t] is -inf (a masked key); returns their sum.
float exp_shifted(float* w, int64_t keys, float top) {
  float total = 0.f;
  int64_t t = 0;
#ifdef __AVX512F__
  __m512 sum = _mm512_setzero_ps();
  const __m512 shift = _mm512_set1_ps(top), minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (; t < keys; t += 16) {
    const __mmask16 lanes = keys - t >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (keys - t)) - 1);
    const __m512 s = _mm512_maskz_loadu_ps(lanes, w + t);
    const __mmask16 kept = _mm512_mask_cmp_ps_mask(lanes, s, minus_inf, _CMP_NEQ_OQ);
    const __m512 e = _mm512_maskz_mov_ps(kept, exp_le0(_mm512_sub_ps(s, shift)));
    _mm512_mask_storeu_ps(w + t, lanes, e);
    sum = _mm512_add_ps(sum, e);
  }
  total = _mm512_reduce_add_ps(sum);
#endif
  for (; t < keys; ++t) total += (w[t] = std::isinf(w[t]) ? 0.f : std::exp(w[t] - top));
  return total;
}

// Softmax attention of the `heads` query heads of one KV group (q, out: heads x D, consecutive) over the first
// `keys` slots of the group's cache, each key and value read once for all of them; a slot is visible when its
// position is >= 0 (filled, not left padding) and not after the query's. w: heads x keys scratch.
void attend(const float* q, const float* kg, const float* vg, const int64_t* kpos, int64_t qpos, int64_t keys,
            int64_t heads, int64_t D, float scale, float* w, float* out) {
  std::vector<float> top(heads, -std::numeric_limits<float>::infinity()), inv(heads);
  for (int64_t t = 0; t < keys; ++t) {
    const bool visible = kpos[t] >= 0 && kpos[t] <= qpos;
    const float* kt = kg + t * D;
    for (int64_t j = 0; j < heads; ++j) {
      float dot = 0.f;
      if (visible) {
        const float* qj = q + j * D;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < D; ++i) dot += qj[i] * kt[i];
      }
      w[j * keys + t] = visible ? dot * scale : -std::numeric_limits<float>::infinity();
      top[j] = std::max(top[j], w[j * keys + t]);
    }
  }
  for (int64_t j = 0; j < heads; ++j) {
    const float total = exp_shifted(w + j * keys, keys, top[j]);
    inv[j] = total > 0.f ? 1.f / total : 0.f;
  }
  std::fill(out, out + heads * D, 0.f);
  for (int64_t t = 0; t < keys; ++t) {
    const float* vt = vg + t * D;
    for (int64_t j = 0; j < heads; ++j) {
      const float p = w[j * keys + t] * inv[j];
      if (p == 0.f) continue;
      float* oj = out + j * D;
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) oj[i] += p * vt[i];
    }
  }
}

struct Layer {
  const float *attn_norm, *mlp_norm;
  Linear q, k, v, o, gate, up, down;
  float *kc, *vc;
  int64_t* pc;
  double attn_eps, mlp_eps;
};

at::Tensor native_decode(const at::Tensor& x, at::TensorList params, at::IntArrayRef ints, at::ArrayRef<double> floats,
                         const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions) {
  TORCH_CHECK(ints.size() == 7, "lucidlm native_decode: 7 ints expected, got ", ints.size());
  const int64_t layers = ints[0], H = ints[1], G = ints[2], D = ints[3], dims = ints[4], slot = ints[6];
  const bool interleaved = ints[5] != 0;
  TORCH_CHECK(static_cast<int64_t>(params.size()) == layers * kLayerSlots + 1 + kLinearSlots &&
              static_cast<int64_t>(floats.size()) == 2 + 2 * layers, "lucidlm native_decode: ",
              layers * kLayerSlots + 1 + kLinearSlots, " tensors and ", 2 + 2 * layers, " floats expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "lucidlm native_decode: x (B, E) contiguous float32 expected");
  TORCH_CHECK(H % G == 0 && dims <= D && dims % 2 == 0, "lucidlm native_decode: heads, groups or rotary dims");
  const int64_t M = x.size(0), E = x.size(1), I = params[18].size(0), cap = params[30].size(2);
  TORCH_CHECK(slot >= 0 && slot < cap, "lucidlm native_decode: slot ", slot, " outside the cache's ", cap);
  TORCH_CHECK(cos.numel() == M * dims && sin.numel() == M * dims && positions.numel() == M,
              "lucidlm native_decode: cos/sin (B, dims) and positions (B,) expected");
  std::vector<Layer> net(layers);
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* p = params.data() + l * kLayerSlots;
    for (int64_t i : {30, 31})
      TORCH_CHECK(p[i].scalar_type() == at::kFloat && p[i].is_contiguous() && p[i].sizes() == p[30].sizes() &&
                  p[i].size(0) == M && p[i].size(1) == G && p[i].size(2) == cap && p[i].size(3) == D,
                  "lucidlm native_decode: layer ", l, ": cache (B, groups, capacity, head size) float32 expected");
    TORCH_CHECK(p[32].scalar_type() == at::kLong && p[32].is_contiguous() && p[32].numel() == M * cap,
                "lucidlm native_decode: layer ", l, ": cache positions (B, capacity) int64 expected");
    net[l] = {p[0].data_ptr<float>(), p[17].data_ptr<float>(), describe(p + 1, E, "q"), describe(p + 5, E, "k"),
              describe(p + 9, E, "v"), describe(p + 13, H * D, "o"), describe(p + 18, E, "gate"),
              describe(p + 22, E, "up"), describe(p + 26, I, "down"), p[30].data_ptr<float>(),
              p[31].data_ptr<float>(), p[32].data_ptr<int64_t>(), floats[1 + 2 * l], floats[2 + 2 * l]};
    TORCH_CHECK(net[l].q.n == H * D && net[l].k.n == G * D && net[l].v.n == G * D && net[l].o.n == E &&
                net[l].up.n == I && net[l].down.n == E, "lucidlm native_decode: layer ", l, ": product shapes");
  }
  const at::Tensor* tail = params.data() + layers * kLayerSlots;
  const float* final_norm = tail[0].data_ptr<float>();
  const Linear head = describe(tail + 1, E, "lm_head");
  at::Tensor logits = at::empty({M, head.n}, x.options());
  at::Tensor h = x.clone();
  std::vector<float> q(M * H * D), k(M * G * D), v(M * G * D), att(M * H * D), act(M * I), inner(M * I);
  float* hp = h.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  const int64_t* qpos = positions.data_ptr<int64_t>();
  const float scale = static_cast<float>(floats[0]);
  const int64_t keys = slot + 1, per_group = H / G;
  for (const Layer& L : net)  // the new token's position, before any thread attends to its slot
    for (int64_t r = 0; r < M; ++r) L.pc[r * cap + slot] = qpos[r];
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> a(M * E), xs(M * std::max({E, I, H * D}) / 32 + 1), w(per_group * keys), part(M * E);
    for (const Layer& L : net) {
      rms_norm(hp, L.attn_norm, L.attn_eps, a.data(), xs.data(), M, E);
      products({{&L.q, q.data()}, {&L.k, k.data()}, {&L.v, v.data()}}, a.data(), xs.data(), M);
#pragma omp barrier
      // by (row, KV group): the group's keys rotated and written into the cache, then its query heads
      // rotated and attending; no other thread touches this group's slots, so no barrier in between
      const auto [gb, ge] = share(M * G, 1);
      for (int64_t job = gb; job < ge; ++job) {
        const int64_t r = job / G, g = job % G, at = (r * G + g) * cap * D;
        float* key = k.data() + job * D;
        rope(key, dims, interleaved, cp + r * dims, sp + r * dims);
        std::copy(key, key + D, L.kc + at + slot * D);
        std::copy(v.data() + job * D, v.data() + (job + 1) * D, L.vc + at + slot * D);
        float* queries = q.data() + (r * H + g * per_group) * D;
        for (int64_t h = 0; h < per_group; ++h) rope(queries + h * D, dims, interleaved, cp + r * dims, sp + r * dims);
        attend(queries, L.kc + at, L.vc + at, L.pc + r * cap, qpos[r], keys, per_group, D, scale, w.data(),
               att.data() + (r * H + g * per_group) * D);
      }
#pragma omp barrier
      {  // o: this thread's rows, added into the residual (no other thread reads or writes them now)
        const auto [b, e] = share(E, kRowAlign);
        if ((H * D) % 32 == 0) lucidlm_native::q4_sums(att.data(), M, H * D, xs.data());
        rows(L.o, att.data(), xs.data(), part.data(), M, b, e);
        for (int64_t r = 0; r < M; ++r)
          for (int64_t i = b; i < e; ++i) hp[r * E + i] += part[r * E + i];
      }
#pragma omp barrier
      rms_norm(hp, L.mlp_norm, L.mlp_eps, a.data(), xs.data(), M, E);
      {  // gate and up: the same rows of both, so SwiGLU needs no barrier
        const auto [b, e] = share(I, kRowAlign);
        rows(L.gate, a.data(), xs.data(), act.data(), M, b, e);
        rows(L.up, a.data(), xs.data(), inner.data(), M, b, e);
        for (int64_t r = 0; r < M; ++r)
          for (int64_t i = b; i < e; ++i) {
            const float g = act[r * I + i];
            act[r * I + i] = g / (1.f + std::exp(-g)) * inner[r * I + i];
          }
      }
#pragma omp barrier
      {
        const auto [b, e] = share(E, kRowAlign);
        if (I % 32 == 0) lucidlm_native::q4_sums(act.data(), M, I, xs.data());
        rows(L.down, act.data(), xs.data(), part.data(), M, b, e);
        for (int64_t r = 0; r < M; ++r)
          for (int64_t i = b; i < e; ++i) hp[r * E + i] += part[r * E + i];
      }
#pragma omp barrier
    }
    rms_norm(hp, final_norm, floats[1 + 2 * layers], a.data(), xs.data(), M, E);
    products({{&head, logits.data_ptr<float>()}}, a.data(), xs.data(), M);
  }
  return logits;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lucidlm_kernels, m) {
  // writes the new token's keys, values and position into the cache tensors of `params` (never traced)
  m.def("native_decode(Tensor x, Tensor[] params, int[] ints, float[] floats, Tensor cos, Tensor sin, "
        "Tensor positions) -> Tensor");
}

TORCH_LIBRARY_IMPL(lucidlm_kernels, CPU, m) { m.impl("native_decode", &native_decode); }
