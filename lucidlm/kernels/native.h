// The products of decode.cpp's native step: rows [begin, end) of y = x W^T (+ bias) computed on the calling
// thread only (the step splits the rows of every phase across its own threads). They run the ops' own code:
// f32_span is gemv.cpp's float kernel, q8_span / q4_span qgemv.cpp's 8-bit / 4-bit paths (AVX-512 where the
// CPU has it, else portable; never the opt-in VNNI path). x (m, k) float32, y (m, n) float32, both row-major.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace lucidlm_native {

void f32_span(const float* x, const float* w, const float* bias, float* y, int64_t m, int64_t n, int64_t k,
              int64_t begin, int64_t end);
// scales: (n, k / B) of `stype` (float16, bfloat16 or float32); B = 32 for Q8_0, k for per-channel int8.
void q8_span(const float* x, const int8_t* q, const void* scales, at::ScalarType stype, const float* bias, float* y,
             int64_t m, int64_t n, int64_t k, int64_t B, int64_t begin, int64_t end);
// xsum: q4_sums of x; scales and mins (or nullptr: Q4_0) float16 (n, k / 32).
void q4_span(const float* x, const float* xsum, const uint8_t* q, const void* scales, const void* mins,
             const float* bias, float* y, int64_t m, int64_t n, int64_t k, int64_t begin, int64_t end);
// Σx over each 32-block of every row of x: xsum (m, k / 32).
void q4_sums(const float* x, int64_t m, int64_t k, float* xsum);

}  // namespace lucidlm_native
