// y = x @ dequantise(w).T (+ bias) for a few rows of x, reading quantised weights as they are stored:
// the decode step's products for 8-bit (per-channel int8, GGUF Q8_0) and 4-bit (GGUF Q4_0 / Q4_1) weights.
//
// Storage (lucidlm/model/qlinear.py, one copy of the truth):
//   8-bit: qs int8 (n, k), scales (n, k / B) float16 | bfloat16 | float32; w[i][j] = qs[i][j] * scales[i][j / B].
//   4-bit: qs uint8 (n, k / 2), 32-weight blocks of 16 bytes (weight j: low nibble of byte j, weight j + 16:
//          its high nibble), scales float16 (n, k / 32), mins float16 (n, k / 32) or none;
//          w = (nibble - 8) * d (Q4_0) or nibble * d + m (Q4_1).
// Bound by memory bandwidth: each thread streams a contiguous block of weight rows once and takes its dot
// products with every row of x (converted once per call to float32, kept in L1). Accumulation is float32.
//
// Paths, picked at run time: AVX-512 (float activations, the default: the exact dequantised product up to
// float32 summation order); AVX-512 VNNI for 8-bit weights (opt-in, LUCIDLM_VNNI=1: x quantised to int8 per
// 32-block as llama.cpp's Q8_0 dot does, so results differ slightly); a portable C++ path elsewhere
// (LUCIDLM_KERNEL_PORTABLE=1 forces it). Compiled by lucidlm/kernels/build.py together with gemv.cpp.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "native.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__)
#include <immintrin.h>
#define LUCIDLM_AVX512 1
#endif

namespace {

constexpr int64_t kMaxRows = 4;  // x rows handled together (a decode step's few tokens); more go in groups
constexpr int64_t kQ4Block = 32;
// Software prefetch distance: the whole model's weights stream from DRAM once per decode step, and one core's
// hardware prefetchers alone kept ~6 GB/s in flight; requesting 8 KB ahead measured 1.5x faster (1 thread).
constexpr int64_t kPrefetchBytes = 8192;

// Prefetch the bytes [from, from + count) that lie before `stop` (the end of this thread's weight rows).
inline void prefetch(const void* from, int64_t count, const void* stop) {
#ifdef LUCIDLM_AVX512
  const char* end = std::min(static_cast<const char*>(from) + count, static_cast<const char*>(stop));
  for (const char* p = static_cast<const char*>(from); p < end; p += 64) _mm_prefetch(p, _MM_HINT_T0);
#else
  (void)from, (void)count, (void)stop;
#endif
}

inline float half_to_float(uint16_t h) {
  // IEEE binary16 -> float32 (subnormals included), without F16C so the portable path has no ISA needs
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {
      float f = std::ldexp(static_cast<float>(man), -24);
      std::memcpy(&bits, &f, sizeof f);
      bits |= sign;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// `count` scales from element `first` on, as float32 (scale rows are contiguous: several rows in one call).
void scales_to_float(const void* base, at::ScalarType type, int64_t first, int64_t count, float* out) {
  switch (type) {
    case at::kHalf: {
      const uint16_t* s = static_cast<const uint16_t*>(base) + first;
      int64_t b = 0;
#ifdef LUCIDLM_AVX512
      for (; b + 16 <= count; b += 16)
        _mm512_storeu_ps(out + b, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + b))));
#endif
      for (; b < count; ++b) out[b] = half_to_float(s[b]);
      break;
    }
    case at::kBFloat16: {
      const uint16_t* s = static_cast<const uint16_t*>(base) + first;
      for (int64_t b = 0; b < count; ++b) out[b] = bf16_to_float(s[b]);
      break;
    }
    default: {
      const float* s = static_cast<const float*>(base) + first;
      for (int64_t b = 0; b < count; ++b) out[b] = s[b];
    }
  }
}

// The scales of one weight row as float32 (a small per-thread buffer: k / B values).
void row_scales(const at::Tensor& scales, int64_t row, int64_t count, float* out) {
  scales_to_float(scales.data_ptr(), scales.scalar_type(), row * count, count, out);
}

bool env_flag(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && value[0] == '1';
}

bool use_avx512() {
#ifdef LUCIDLM_AVX512
  return !env_flag("LUCIDLM_KERNEL_PORTABLE");
#else
  return false;
#endif
}

bool use_vnni() {
#ifdef LUCIDLM_AVX512
  static const bool cpu_has = __builtin_cpu_supports("avx512vnni");
  return cpu_has && env_flag("LUCIDLM_VNNI") && use_avx512();
#else
  return false;
#endif
}

// ---------------------------------------------------------------- portable paths (any CPU)

// y[r][row] for 8-bit weights, float activations: one partial sum per block, times its scale.
void q8_rows_portable(const float* x, const int8_t* q, const float* s, float* acc, int64_t m, int64_t k, int64_t B) {
  for (int64_t r = 0; r < m; ++r) {
    float total = 0.f;
    for (int64_t b0 = 0; b0 < k; b0 += B) {
      float part = 0.f;
      for (int64_t j = b0; j < b0 + B; ++j) part += x[r * k + j] * static_cast<float>(q[j]);
      total += part * s[b0 / B];
    }
    acc[r] = total;
  }
}

void q4_rows_portable(const float* x, const float* xsum, const uint8_t* q, const float* d, const float* mn,
                      float* acc, int64_t m, int64_t k) {
  const int64_t blocks = k / kQ4Block;
  for (int64_t r = 0; r < m; ++r) {
    float total = 0.f;
    for (int64_t b = 0; b < blocks; ++b) {
      const float* xb = x + r * k + b * kQ4Block;
      const uint8_t* qb = q + b * kQ4Block / 2;
      float part = 0.f;
      for (int64_t j = 0; j < kQ4Block / 2; ++j)
        part += xb[j] * static_cast<float>(qb[j] & 0x0f) + xb[j + 16] * static_cast<float>(qb[j] >> 4);
      const float offset = mn ? mn[b] : -8.f * d[b];  // Σ (n·d + m)·x = d·Σ n·x + m·Σ x
      total += part * d[b] + offset * xsum[r * blocks + b];
    }
    acc[r] = total;
  }
}

#ifdef LUCIDLM_AVX512
// ---------------------------------------------------------------- AVX-512 paths

inline __m512 load_q8_as_float(const int8_t* q, __mmask16 mask) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, q)));
}

// 8-bit weights, float activations, B a multiple of 32 (Q8_0; per-channel int8 with k % 32 == 0), R weight
// rows at once (consecutive rows: q and s with strides k and k / B) against M rows of x: the x loads are
// shared by the R rows and the R * M accumulator chains are independent, so neither load nor FMA latency
// limits the loop. Scales are indexed by group (B / 32 blocks each), never by a division in the loop: an
// integer division per block cost more than the block's arithmetic. out[r * R + i] = x row r . weight row i.
template <int M, int R>
void q8_rows_avx512(const float* x, const int8_t* q, const float* s, float* out, int64_t k, int64_t B) {
  const int64_t groups = k / B, per_group = B / 32;
  __m512 total[M][R];
  for (int r = 0; r < M; ++r)
    for (int i = 0; i < R; ++i) total[r][i] = _mm512_setzero_ps();
  const auto widen = [](const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  };
  if (per_group == 1) {  // Q8_0: one scale per block, folded in per block
    for (int64_t j = 0, b = 0; j < k; j += 32, ++b) {
      __m512 x0[M], x1[M];
      for (int r = 0; r < M; ++r) x0[r] = _mm512_loadu_ps(x + r * k + j), x1[r] = _mm512_loadu_ps(x + r * k + j + 16);
      for (int i = 0; i < R; ++i) {
        const __m512 w0 = widen(q + i * k + j), w1 = widen(q + i * k + j + 16);
        const __m512 scale = _mm512_set1_ps(s[i * groups + b]);
        for (int r = 0; r < M; ++r)
          total[r][i] = _mm512_fmadd_ps(_mm512_fmadd_ps(w1, x1[r], _mm512_mul_ps(w0, x0[r])), scale, total[r][i]);
      }
    }
  } else {  // larger groups (per-channel int8: one group): unscaled partial sums, one scale per group
    for (int64_t g = 0; g < groups; ++g) {
      __m512 lo[M][R], hi[M][R];
      for (int r = 0; r < M; ++r)
        for (int i = 0; i < R; ++i) lo[r][i] = _mm512_setzero_ps(), hi[r][i] = _mm512_setzero_ps();
      for (int64_t j = g * B; j < (g + 1) * B; j += 32) {
        __m512 x0[M], x1[M];
        for (int r = 0; r < M; ++r) x0[r] = _mm512_loadu_ps(x + r * k + j), x1[r] = _mm512_loadu_ps(x + r * k + j + 16);
        for (int i = 0; i < R; ++i) {
          const __m512 w0 = widen(q + i * k + j), w1 = widen(q + i * k + j + 16);
          for (int r = 0; r < M; ++r)
            lo[r][i] = _mm512_fmadd_ps(w0, x0[r], lo[r][i]), hi[r][i] = _mm512_fmadd_ps(w1, x1[r], hi[r][i]);
        }
      }
      for (int i = 0; i < R; ++i) {
        const __m512 scale = _mm512_set1_ps(s[i * groups + g]);
        for (int r = 0; r < M; ++r) total[r][i] = _mm512_fmadd_ps(_mm512_add_ps(lo[r][i], hi[r][i]), scale, total[r][i]);
      }
    }
  }
  for (int r = 0; r < M; ++r)
    for (int i = 0; i < R; ++i) out[r * R + i] = _mm512_reduce_add_ps(total[r][i]);
}

// Any other block size (per-channel int8 with k not a multiple of 32): 16-lane chunks with a masked tail.
template <int M>
void q8_rows_avx512_any(const float* x, const int8_t* q, const float* s, float* acc, int64_t k, int64_t B) {
  __m512 total[M];
  for (int r = 0; r < M; ++r) total[r] = _mm512_setzero_ps();
  for (int64_t b0 = 0; b0 < k; b0 += B) {
    __m512 part[M];
    for (int r = 0; r < M; ++r) part[r] = _mm512_setzero_ps();
    for (int64_t j = b0; j < b0 + B; j += 16) {
      const int64_t left = b0 + B - j;
      const __mmask16 mask = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1);
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, q + j)));
      for (int r = 0; r < M; ++r) part[r] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(mask, x + r * k + j), part[r]);
    }
    const __m512 scale = _mm512_set1_ps(s[b0 / B]);
    for (int r = 0; r < M; ++r) total[r] = _mm512_fmadd_ps(part[r], scale, total[r]);
  }
  for (int r = 0; r < M; ++r) acc[r] = _mm512_reduce_add_ps(total[r]);
}

// 4-bit weights, float activations, R consecutive weight rows (q, d, mn with strides k / 2, k / 32, k / 32)
// against M rows of x: the 16 bytes of a block widened to 16 int32 lanes, low and high nibbles split, each
// multiplied by its 16 activations, folded into the row's accumulator with the block's d; the -8 (Q4_0) or
// m (Q4_1) term is Σ_b offset_b · Σx_b, one dot product over the blocks afterwards. out[r * R + i].
template <int M, int R>
void q4_rows_avx512(const float* x, const float* xsum, const uint8_t* q, const float* d, const float* mn,
                    float* out, int64_t k) {
  const int64_t blocks = k / kQ4Block;
  const __m512i low = _mm512_set1_epi32(0x0f);
  __m512 total[M][R];
  for (int r = 0; r < M; ++r)
    for (int i = 0; i < R; ++i) total[r][i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512 x0[M], x1[M];
    for (int r = 0; r < M; ++r)
      x0[r] = _mm512_loadu_ps(x + r * k + b * kQ4Block), x1[r] = _mm512_loadu_ps(x + r * k + b * kQ4Block + 16);
    for (int i = 0; i < R; ++i) {
      const __m512i bytes =
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i * (k / 2) + b * 16)));
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, low));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
      const __m512 scale = _mm512_set1_ps(d[i * blocks + b]);
      for (int r = 0; r < M; ++r)
        total[r][i] = _mm512_fmadd_ps(_mm512_fmadd_ps(hi, x1[r], _mm512_mul_ps(lo, x0[r])), scale, total[r][i]);
    }
  }
  for (int r = 0; r < M; ++r) {
    const float* xs = xsum + r * blocks;
    for (int i = 0; i < R; ++i) {
      const float* di = d + i * blocks;
      float offset = 0.f;
      if (mn) {
        for (int64_t b = 0; b < blocks; ++b) offset += mn[i * blocks + b] * xs[b];
      } else {
        for (int64_t b = 0; b < blocks; ++b) offset -= 8.f * di[b] * xs[b];
      }
      out[r * R + i] = _mm512_reduce_add_ps(total[r][i]) + offset;
    }
  }
}

// 8-bit weights, int8 activations (x quantised per 32-block: xq, dx), VNNI: two 32-weight blocks per
// 512-bit dpbusd. dpbusd multiplies unsigned by signed bytes, so |x| goes unsigned and x's sign moves to w.
template <int M>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
void q8_rows_vnni(const int8_t* xq, const float* dx, const int8_t* q, const float* s, float* acc, int64_t k,
                  int64_t B) {
  const int64_t blocks = k / 32;
  __m512 total[M];
  for (int r = 0; r < M; ++r) total[r] = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) {
    const __m512i w = _mm512_loadu_si512(q + b * 32);
    const float s0 = s[b * 32 / B], s1 = s[(b + 1) * 32 / B];
    for (int r = 0; r < M; ++r) {
      const __m512i xv = _mm512_loadu_si512(xq + r * k + b * 32);
      const __m512i signed_w = _mm512_mask_sub_epi8(w, _mm512_movepi8_mask(xv), zero, w);
      const __m512i dots = _mm512_dpbusd_epi32(zero, _mm512_abs_epi8(xv), signed_w);
      const __m512 scale = _mm512_insertf32x8(_mm512_set1_ps(s0 * dx[r * blocks + b]),
                                              _mm256_set1_ps(s1 * dx[r * blocks + b + 1]), 1);
      total[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), scale, total[r]);
    }
  }
  for (int r = 0; r < M; ++r) {
    float tail = 0.f;
    for (int64_t bb = b; bb < blocks; ++bb) {
      int32_t dot = 0;
      for (int64_t j = bb * 32; j < bb * 32 + 32; ++j) dot += static_cast<int32_t>(xq[r * k + j]) * q[j];
      tail += static_cast<float>(dot) * s[bb * 32 / B] * dx[r * blocks + bb];
    }
    acc[r] = _mm512_reduce_add_ps(total[r]) + tail;
  }
}
#endif

// x (m, k) float32 -> int8 per 32-block with scale max|x| / 127 (llama.cpp's quantize_row_q8_0).
void quantize_x(const float* x, int8_t* xq, float* dx, int64_t m, int64_t k) {
  const int64_t blocks = k / 32;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t b = 0; b < blocks; ++b) {
      const float* xb = x + r * k + b * 32;
      float amax = 0.f;
      for (int j = 0; j < 32; ++j) amax = std::fmax(amax, std::fabs(xb[j]));
      const float d = amax / 127.f, inv = d != 0.f ? 1.f / d : 0.f;
      dx[r * blocks + b] = d;
      for (int j = 0; j < 32; ++j) xq[r * k + b * 32 + j] = static_cast<int8_t>(std::nearbyint(xb[j] * inv));
    }
}

// Runs `rows(first_x_row, count, weight_row, scales_of_row, out_of_row)` for every weight row, x rows in
// groups of kMaxRows, weight rows split into contiguous per-thread blocks.
template <typename Rows>
void for_each_row(int64_t m, int64_t n, int64_t scale_count, float* y, const float* bias, const void* weights,
                  int64_t row_bytes, Rows rows) {
  const char* w = static_cast<const char*>(weights);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(2 * scale_count);
    float acc[kMaxRows];
    prefetch(w + begin * row_bytes, kPrefetchBytes, w + end * row_bytes);
    for (int64_t row = begin; row < end; ++row) {
      prefetch(w + row * row_bytes + kPrefetchBytes, row_bytes, w + end * row_bytes);
      const float b = bias ? bias[row] : 0.f;
      for (int64_t r0 = 0; r0 < m; r0 += kMaxRows) {
        const int64_t count = std::min(kMaxRows, m - r0);
        rows(r0, count, row, buffer.data(), acc);
        for (int64_t r = 0; r < count; ++r) y[(r0 + r) * n + row] = acc[r] + b;
      }
    }
  });
}

template <typename Fn>
void by_rows(int64_t count, Fn fn) {  // fn(std::integral_constant<int, M>) with M = count (1..4)
  switch (count) {
    case 1: fn(std::integral_constant<int, 1>()); break;
    case 2: fn(std::integral_constant<int, 2>()); break;
    case 3: fn(std::integral_constant<int, 3>()); break;
    default: fn(std::integral_constant<int, 4>()); break;
  }
}

void check_x(const at::Tensor& x, int64_t k, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "lucidlm ", op, ": x (m, ", k, ") expected, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "lucidlm ", op, ": float32 or bfloat16 activations expected, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), "lucidlm ", op, ": CPU tensors only");
}

at::Tensor finish(const at::Tensor& y, const at::Tensor& x) { return y.to(x.scalar_type()); }

#ifdef LUCIDLM_AVX512
// The AVX-512 8-bit product for B % 32 == 0: each thread takes a contiguous span of weight rows, kRowTile
// at a time (their scales converted in one call), with every group of up to kMaxRows rows of x.
constexpr int64_t kRowTile = 4;

template <int M>
void q8_tile(const float* x, const int8_t* q, const float* s, const float* bias, float* y, int64_t rows,
             int64_t n, int64_t k, int64_t B) {
  float out[M * kRowTile];
  const auto store = [&](int R) {
    for (int r = 0; r < M; ++r)
      for (int i = 0; i < R; ++i) y[r * n + i] = out[r * R + i] + (bias ? bias[i] : 0.f);
  };
  if (rows == kRowTile) {
    q8_rows_avx512<M, kRowTile>(x, q, s, out, k, B);
    store(kRowTile);
  } else {
    for (int64_t i = 0; i < rows; ++i) {
      q8_rows_avx512<M, 1>(x, q + i * k, s + i * (k / B), out, k, B);
      for (int r = 0; r < M; ++r) y[r * n + i] = out[r] + (bias ? bias[i] : 0.f);
    }
  }
}

// Rows [begin, end) of one thread (the callers split the rows: the op below, decode.cpp's native step).
void q8_span_avx512(const float* x, const int8_t* q, const void* sbase, at::ScalarType stype, const float* bias,
                    float* y, int64_t m, int64_t n, int64_t k, int64_t B, int64_t begin, int64_t end) {
  const int64_t count = k / B;
  std::vector<float> sc(kRowTile * count);
  const int8_t* stop = q + end * k;
  prefetch(q + begin * k, kPrefetchBytes, stop);
  for (int64_t row = begin; row < end; row += kRowTile) {
    const int64_t rows = std::min(kRowTile, end - row);
    prefetch(q + row * k + kPrefetchBytes, rows * k, stop);
    scales_to_float(sbase, stype, row * count, rows * count, sc.data());
    for (int64_t r0 = 0; r0 < m; r0 += kMaxRows) {
      const float* xr = x + r0 * k;
      float* yr = y + r0 * n + row;
      const float* br = bias ? bias + row : nullptr;
      by_rows(std::min(kMaxRows, m - r0), [&](auto M) {
        q8_tile<decltype(M)::value>(xr, q + row * k, sc.data(), br, yr, rows, n, k, B);
      });
    }
  }
}
#endif

#ifdef LUCIDLM_AVX512
// The AVX-512 4-bit product: as q8_span_avx512, kRowTile weight rows at a time (scales and mins converted
// once per tile), with every group of up to kMaxRows rows of x.
void q4_span_avx512(const float* x, const float* xsum, const uint8_t* q, const void* scales, const void* mins,
                    const float* bias, float* y, int64_t m, int64_t n, int64_t k, int64_t begin, int64_t end) {
  const int64_t blocks = k / kQ4Block, row_bytes = k / 2;
  std::vector<float> d(kRowTile * blocks), mn(mins ? kRowTile * blocks : 0);
  const uint8_t* stop = q + end * row_bytes;
  float out[kMaxRows * kRowTile];
  prefetch(q + begin * row_bytes, kPrefetchBytes, stop);
  for (int64_t row = begin; row < end; row += kRowTile) {
    const int64_t rows = std::min(kRowTile, end - row);
    prefetch(q + row * row_bytes + kPrefetchBytes, rows * row_bytes, stop);
    scales_to_float(scales, at::kHalf, row * blocks, rows * blocks, d.data());
    if (mins) scales_to_float(mins, at::kHalf, row * blocks, rows * blocks, mn.data());
    for (int64_t r0 = 0; r0 < m; r0 += kMaxRows) {
      const float* xr = x + r0 * k;
      const float* xs = xsum + r0 * blocks;
      by_rows(std::min(kMaxRows, m - r0), [&](auto Mc) {
        constexpr int M = decltype(Mc)::value;
        for (int64_t i = 0; i < rows; i += (rows == kRowTile ? kRowTile : 1)) {
          const int R = rows == kRowTile ? kRowTile : 1;
          const float* mi = mins ? mn.data() + i * blocks : nullptr;
          if (R == kRowTile)
            q4_rows_avx512<M, kRowTile>(xr, xs, q + row * row_bytes, d.data(), mi, out, k);
          else
            q4_rows_avx512<M, 1>(xr, xs, q + (row + i) * row_bytes, d.data() + i * blocks, mi, out, k);
          for (int r = 0; r < M; ++r)
            for (int j = 0; j < R; ++j)
              y[(r0 + r) * n + row + i + j] = out[r * R + j] + (bias ? bias[row + i + j] : 0.f);
        }
      });
    }
  }
}
#endif

at::Tensor q8_gemv(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales,
                   const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(qs.dim() == 2 && qs.scalar_type() == at::kChar, "lucidlm q8_gemv: qs int8 (n, k) expected, got ",
              qs.scalar_type(), " ", qs.sizes());
  const int64_t n = qs.size(0), k = qs.size(1), m = x.size(0);
  check_x(x, k, "q8_gemv");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == n && scales.size(1) > 0 && k % scales.size(1) == 0,
              "lucidlm q8_gemv: scales (n, k / B) expected for qs ", qs.sizes(), ", got ", scales.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kBFloat16 ||
              scales.scalar_type() == at::kFloat,
              "lucidlm q8_gemv: float16, bfloat16 or float32 scales expected, got ", scales.scalar_type());
  const int64_t count = scales.size(1), B = k / count;
  at::Tensor xf = x.to(at::kFloat).contiguous(), q = qs.contiguous(), s = scales.contiguous();
  at::Tensor bf = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  if (use_vnni() && B % 32 == 0) {
#ifdef LUCIDLM_AVX512
    std::vector<int8_t> xq(m * k);
    std::vector<float> dx(m * (k / 32));
    quantize_x(xp, xq.data(), dx.data(), m, k);
    for_each_row(m, n, count, yp, bp, qp, k, [&](int64_t r0, int64_t rows, int64_t row, float* sc, float* acc) {
      row_scales(s, row, count, sc);
      by_rows(rows, [&](auto M) {
        q8_rows_vnni<decltype(M)::value>(xq.data() + r0 * k, dx.data() + r0 * (k / 32), qp + row * k, sc, acc, k, B);
      });
    });
    return finish(y, x);
#endif
  }
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    lucidlm_native::q8_span(xp, qp, s.data_ptr(), s.scalar_type(), bp, yp, m, n, k, B, begin, end);
  });
  return finish(y, x);
}

at::Tensor q4_gemv(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales,
                   const std::optional<at::Tensor>& mins, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(qs.dim() == 2 && qs.scalar_type() == at::kByte && qs.size(1) % (kQ4Block / 2) == 0,
              "lucidlm q4_gemv: qs uint8 (n, k / 2) with k a multiple of 32 expected, got ", qs.scalar_type(), " ",
              qs.sizes());
  const int64_t n = qs.size(0), k = qs.size(1) * 2, m = x.size(0), blocks = k / kQ4Block;
  check_x(x, k, "q4_gemv");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.dim() == 2 && scales.size(0) == n &&
              scales.size(1) == blocks, "lucidlm q4_gemv: scales float16 (", n, ", ", blocks, ") expected, got ",
              scales.scalar_type(), " ", scales.sizes());
  if (mins)
    TORCH_CHECK(mins->scalar_type() == at::kHalf && mins->sizes() == scales.sizes(),
                "lucidlm q4_gemv: mins float16 ", scales.sizes(), " expected, got ", mins->scalar_type(), " ",
                mins->sizes());
  at::Tensor xf = x.to(at::kFloat).contiguous(), q = qs.contiguous(), s = scales.contiguous();
  at::Tensor mn = mins ? mins->contiguous() : at::Tensor();
  at::Tensor bf = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  std::vector<float> xsum(m * blocks);  // Σx per 32-block: carries Q4_0's -8 and Q4_1's m
  lucidlm_native::q4_sums(xp, m, k, xsum.data());
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  const void* mp = mn.defined() ? mn.data_ptr() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    lucidlm_native::q4_span(xp, xsum.data(), qp, s.data_ptr(), mp, bp, yp, m, n, k, begin, end);
  });
  return finish(y, x);
}

// Which path a call takes here and now (for tests and the bench): "vnni", "avx512" or "portable".
std::string q8_path() {
  if (use_vnni()) return "vnni";
  return use_avx512() ? "avx512" : "portable";
}

}  // namespace

// The row spans of decode.cpp's native step (native.h): the ops' paths on the calling thread only.
namespace lucidlm_native {

void q4_sums(const float* x, int64_t m, int64_t k, float* xsum) {
  for (int64_t r = 0; r < m; ++r)
    for (int64_t b = 0; b < k / kQ4Block; ++b) {
      float t = 0.f;
      for (int64_t j = 0; j < kQ4Block; ++j) t += x[r * k + b * kQ4Block + j];
      xsum[r * (k / kQ4Block) + b] = t;
    }
}

void q8_span(const float* x, const int8_t* q, const void* scales, at::ScalarType stype, const float* bias, float* y,
             int64_t m, int64_t n, int64_t k, int64_t B, int64_t begin, int64_t end) {
#ifdef LUCIDLM_AVX512
  if (use_avx512() && B % 32 == 0) return q8_span_avx512(x, q, scales, stype, bias, y, m, n, k, B, begin, end);
#endif
  std::vector<float> sc(k / B);
  float acc[kMaxRows];
  for (int64_t row = begin; row < end; ++row) {
    scales_to_float(scales, stype, row * (k / B), k / B, sc.data());
    for (int64_t r0 = 0; r0 < m; r0 += kMaxRows) {
      const int64_t rows = std::min(kMaxRows, m - r0);
#ifdef LUCIDLM_AVX512
      if (use_avx512())
        by_rows(rows, [&](auto M) {
          q8_rows_avx512_any<decltype(M)::value>(x + r0 * k, q + row * k, sc.data(), acc, k, B);
        });
      else
#endif
        q8_rows_portable(x + r0 * k, q + row * k, sc.data(), acc, rows, k, B);
      for (int64_t r = 0; r < rows; ++r) y[(r0 + r) * n + row] = acc[r] + (bias ? bias[row] : 0.f);
    }
  }
}

void q4_span(const float* x, const float* xsum, const uint8_t* q, const void* scales, const void* mins,
             const float* bias, float* y, int64_t m, int64_t n, int64_t k, int64_t begin, int64_t end) {
#ifdef LUCIDLM_AVX512
  if (use_avx512()) return q4_span_avx512(x, xsum, q, scales, mins, bias, y, m, n, k, begin, end);
#endif
  const int64_t blocks = k / kQ4Block;
  std::vector<float> d(blocks), mn(mins ? blocks : 0), acc(m);
  for (int64_t row = begin; row < end; ++row) {
    scales_to_float(scales, at::kHalf, row * blocks, blocks, d.data());
    if (mins) scales_to_float(mins, at::kHalf, row * blocks, blocks, mn.data());
    q4_rows_portable(x, xsum, q + row * (k / 2), d.data(), mins ? mn.data() : nullptr, acc.data(), m, k);
    for (int64_t r = 0; r < m; ++r) y[r * n + row] = acc[r] + (bias ? bias[row] : 0.f);
  }
}

}  // namespace lucidlm_native

TORCH_LIBRARY_FRAGMENT(lucidlm_kernels, m) {
  m.def("q8_gemv(Tensor x, Tensor qs, Tensor scales, Tensor? bias) -> Tensor");
  m.def("q4_gemv(Tensor x, Tensor qs, Tensor scales, Tensor? mins, Tensor? bias) -> Tensor");
  m.def("q8_path() -> str", &q8_path);
}

TORCH_LIBRARY_IMPL(lucidlm_kernels, CPU, m) {
  m.impl("q8_gemv", &q8_gemv);
  m.impl("q4_gemv", &q4_gemv);
}
