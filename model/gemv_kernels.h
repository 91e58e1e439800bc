// The inner loops of the few-row products, shared by gemv.cpp (one projection) and moe_decode.cpp (an MoE
// layer's decode step): R weight rows at a time, read once, against every token while they sit in L1.
//
// Glossary: M rows of x (tokens), I in_features, O out_features; R weight rows per block.
//
// W (O, I) is row-major, fp32 or bf16, x has W's dtype, sums are fp32. Two inner kernels:
//  - bf16 with AVX512-BF16: VDPBF16PS multiplies 32 bf16 pairs into 16 fp32 sums per instruction;
//  - the portable one (fp32 weights, or bf16 on CPUs without those instructions): plain loops the compiler
//    vectorises for the CPU it is built on (-march=native), a bf16 weight widened to fp32 by a 16-bit shift.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace aetheris {

constexpr int64_t R = 4;          // weight rows per block

inline float widen(uint16_t b) {  // bf16 -> fp32: the bf16 bits are the fp32's upper half
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float widen(float f) { return f; }

inline void prefetch_rows(const void* p, int64_t bytes) {
  for (int64_t k = 0; k < bytes; k += 64) __builtin_prefetch(static_cast<const char*>(p) + k);
}

// y[m, o..o+R) for every token m, portable: one token at a time against the R rows (in L1 after the first).
template <typename W>
void block_portable(const W* w, const W* x, float* y, int64_t M, int64_t I, int64_t O, int64_t o) {
  const W *w0 = w + o * I, *w1 = w0 + I, *w2 = w1 + I, *w3 = w2 + I;
  for (int64_t m = 0; m < M; ++m) {
    const W* xm = x + m * I;
    float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int64_t i = 0; i < I; ++i) {
      float xv = widen(xm[i]);
      a0 += widen(w0[i]) * xv;
      a1 += widen(w1[i]) * xv;
      a2 += widen(w2[i]) * xv;
      a3 += widen(w3[i]) * xv;
    }
    float* ym = y + m * O + o;
    ym[0] = a0, ym[1] = a1, ym[2] = a2, ym[3] = a3;
  }
}

// One row (the last O % R rows), any weight type.
template <typename W>
void row_portable(const W* w, const W* x, float* y, int64_t M, int64_t I, int64_t O, int64_t o) {
  for (int64_t m = 0; m < M; ++m) {
    float a = 0;
#pragma omp simd reduction(+ : a)
    for (int64_t i = 0; i < I; ++i) a += widen(w[o * I + i]) * widen(x[m * I + i]);
    y[m * O + o] = a;
  }
}

#if defined(__AVX512BF16__)
// T tokens x R rows, 32 bf16 pairs per VDPBF16PS; needs I % 32 == 0.
template <int T>
void tile_dp(const uint16_t* w, const uint16_t* x, float* y, int64_t I, int64_t O, int64_t o) {
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t i = 0; i < I; i += 32) {
    __m512bh xv[T];
    for (int t = 0; t < T; ++t) xv[t] = (__m512bh)_mm512_loadu_si512(x + t * I + i);
    for (int r = 0; r < R; ++r) {
      __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (o + r) * I + i);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv, xv[t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) y[t * O + o + r] = _mm512_reduce_add_ps(acc[r][t]);
}

inline void block_dp(const uint16_t* w, const uint16_t* x, float* y, int64_t M, int64_t I, int64_t O, int64_t o) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile_dp<4>(w, x + m * I, y + m * O, I, O, o);
  if (m + 2 <= M) tile_dp<2>(w, x + m * I, y + m * O, I, O, o), m += 2;
  if (m < M) tile_dp<1>(w, x + m * I, y + m * O, I, O, o);
}
#endif

template <typename W>
void rows(const W* w, const W* x, float* y, int64_t M, int64_t I, int64_t O, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; o += R) {
    if (o + R > O) {
      for (; o < O; ++o) row_portable(w, x, y, M, I, O, o);
      return;
    }
    prefetch_rows(w + (o + R) * I, std::min(R, O - o - R) * I * int64_t(sizeof(W)));  // the next block
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<W, uint16_t>) {
      if (I % 32 == 0) {
        block_dp(w, x, y, M, I, O, o);
        continue;
      }
    }
#endif
    block_portable(w, x, y, M, I, O, o);
  }
}

// y (M, O) = x (M, I) W^T, the row blocks split among the threads.
template <typename W>
void run(const W* w, const W* x, float* y, int64_t M, int64_t I, int64_t O) {
  int64_t blocks = (O + R - 1) / R;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    rows(w, x, y, M, I, O, b0 * R, std::min(b1 * R, O));
  });
}

}  // namespace aetheris
