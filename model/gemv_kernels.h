// The inner loops of the few-row products, shared by gemv.cpp (one projection) and moe_decode.cpp (an MoE
// layer's decode step): R weight rows at a time, read once, against every token while they sit in L1.
//
// Glossary: M rows of x (tokens), I in_features, O out_features; R weight rows per block.
//
// W (O, I) is row-major, fp32, bf16 or int8 (one fp32 scale per row, applied to the row's sums), x has W's
// dtype (fp32 for int8), sums are fp32. Inner kernels:
//  - bf16 with AVX512-BF16: VDPBF16PS multiplies 32 bf16 pairs into 16 fp32 sums per instruction;
//  - int8 with AVX-512: 16 weights at a time converted to fp32 in registers;
//  - the portable one (fp32 or int8 weights, or bf16 on CPUs without those instructions): plain loops the
//    compiler vectorises for the CPU it is built on (-march=native), a bf16 weight widened to fp32 by a 16-bit
//    shift, an int8 one converted.
// Int4 weights (model/int4.py's layout) have their own row kernel, at the end.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
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
inline float widen(int8_t q) { return float(q); }

inline void prefetch_rows(const void* p, int64_t bytes) {
  for (int64_t k = 0; k < bytes; k += 64) __builtin_prefetch(static_cast<const char*>(p) + k);
}

// y[m, o..o+R) for every token m, portable: one token at a time against the R rows (in L1 after the first).
template <typename W, typename X>
void block_portable(const W* w, const X* x, float* y, int64_t M, int64_t I, int64_t O, int64_t o) {
  const W *w0 = w + o * I, *w1 = w0 + I, *w2 = w1 + I, *w3 = w2 + I;
  for (int64_t m = 0; m < M; ++m) {
    const X* xm = x + m * I;
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
template <typename W, typename X>
void row_portable(const W* w, const X* x, float* y, int64_t M, int64_t I, int64_t O, int64_t o) {
  for (int64_t m = 0; m < M; ++m) {
    float a = 0;
#pragma omp simd reduction(+ : a)
    for (int64_t i = 0; i < I; ++i) a += widen(w[o * I + i]) * widen(x[m * I + i]);
    y[m * O + o] = a;
  }
}

// The M tokens in tiles of 4, 2 and 1: tile(std::integral_constant<int, T>{}, m) multiplies tokens [m, m + T).
template <typename Tile>
void in_tiles(int64_t M, Tile tile) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile(std::integral_constant<int, 4>{}, m);
  if (m + 2 <= M) tile(std::integral_constant<int, 2>{}, m), m += 2;
  if (m < M) tile(std::integral_constant<int, 1>{}, m);
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
#endif

#if defined(__AVX512F__)
// T tokens x R rows of int8 weights, 16 per step, converted to fp32 in registers (raw sums: rows_q8 scales
// them); needs I % 16 == 0.
template <int T>
void tile_q8(const int8_t* w, const float* x, float* y, int64_t I, int64_t O, int64_t o) {
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t i = 0; i < I; i += 16) {
    __m512 xv[T];
    for (int t = 0; t < T; ++t) xv[t] = _mm512_loadu_ps(x + t * I + i);
    for (int r = 0; r < R; ++r) {
      __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (o + r) * I + i));
      __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) y[t * O + o + r] = _mm512_reduce_add_ps(acc[r][t]);
}
#endif

template <typename W, typename X>
void rows(const W* w, const X* x, float* y, int64_t M, int64_t I, int64_t O, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; o += R) {
    if (o + R > O) {
      for (; o < O; ++o) row_portable(w, x, y, M, I, O, o);
      return;
    }
    prefetch_rows(w + (o + R) * I, std::min(R, O - o - R) * I * int64_t(sizeof(W)));  // the next block
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<W, uint16_t>) {
      if (I % 32 == 0) {
        in_tiles(M, [&](auto T, int64_t m) { tile_dp<decltype(T)::value>(w, x + m * I, y + m * O, I, O, o); });
        continue;
      }
    }
#endif
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<W, int8_t>) {
      if (I % 16 == 0) {
        in_tiles(M, [&](auto T, int64_t m) { tile_q8<decltype(T)::value>(w, x + m * I, y + m * O, I, O, o); });
        continue;
      }
    }
#endif
    block_portable(w, x, y, M, I, O, o);
  }
}

// y (M, O) = x (M, I) W^T, the row blocks split among the threads.
template <typename W, typename X>
void run(const W* w, const X* x, float* y, int64_t M, int64_t I, int64_t O) {
  int64_t blocks = (O + R - 1) / R;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    rows(w, x, y, M, I, O, b0 * R, std::min(b1 * R, O));
  });
}

// int8 rows [o0, o1): the sums of the raw int8 weights, then each row's scale.
inline void rows_q8(const int8_t* w, const float* scale, const float* x, float* y, int64_t M, int64_t I, int64_t O,
                    int64_t o0, int64_t o1) {
  rows(w, x, y, M, I, O, o0, o1);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t o = o0; o < o1; ++o) y[m * O + o] *= scale[o];
}

// ---------------------------------------------------------------- int4 weights (model/int4.py)
//
// packed (O, I/2) uint8 and scales (O, I/G) bf16: group g of row o is G weights; byte j of the group holds
// weight j in its low nibble and weight j + G/2 in its high one, each stored as q + 8 (q in [-8, 7]).
// With fp32 tokens (x widened once per call) a group is unpacked once into scaled fp32 weights (s * (u - 8) as one
// FMA on u) and multiplied against every token of a tile while in registers, so the packed bytes are read once
// and the unpacking is shared by the tokens: R rows x up to 2 tokens with AVX-512, one row x up to 4 tokens
// with AVX2, and a portable loop for other CPUs, the last O % R rows, and groups that are not a multiple of
// INT4_STEP. bf16 tokens have their own kernel at the end (AVX512-BF16).

#if defined(__AVX512F__)
constexpr int64_t INT4_STEP = 32;  // the group size the vector form needs a multiple of

// Tokens [t0, t0+T) of rows o..o+R: the R rows' sums are independent chains, which a single row's are not
// (one row at a time waits on the FMA latency at one token).
template <int T>
void int4_tile_rows(const uint8_t* p, const uint16_t* s, const float* x, float* y, int64_t I, int64_t O, int64_t G,
                    int64_t o) {
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  const int64_t H = G / 2, groups = I / G;
  for (int64_t g = 0; g < groups; ++g) {
    __m512 sc[R], off[R];
    for (int r = 0; r < R; ++r) {
      sc[r] = _mm512_set1_ps(widen(s[(o + r) * groups + g]));
      off[r] = _mm512_mul_ps(sc[r], _mm512_set1_ps(-8.f));
    }
    for (int64_t j = 0; j < H; j += 16) {
      __m512 xl[T], xh[T];
      for (int t = 0; t < T; ++t) {
        xl[t] = _mm512_loadu_ps(x + t * I + g * G + j);
        xh[t] = _mm512_loadu_ps(x + t * I + g * G + j + H);
      }
      for (int r = 0; r < R; ++r) {
        __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + (o + r) * (I / 2) + g * H + j));
        __m128i lo = _mm_and_si128(b, _mm_set1_epi8(15));
        __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(15));
        __m512 wl = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), sc[r], off[r]);
        __m512 wh = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), sc[r], off[r]);
        for (int t = 0; t < T; ++t) {
          acc[r][t] = _mm512_fmadd_ps(wl, xl[t], acc[r][t]);
          acc[r][t] = _mm512_fmadd_ps(wh, xh[t], acc[r][t]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) y[t * O + o + r] = _mm512_reduce_add_ps(acc[r][t]);
}
#elif defined(__AVX2__)
inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <int T>
void int4_tile(const uint8_t* row, const uint16_t* scale, const float* x, float* y, int64_t I, int64_t O,
               int64_t G, int64_t o) {
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  const int64_t H = G / 2, groups = I / G;
  for (int64_t g = 0; g < groups; ++g) {
    __m256 s = _mm256_set1_ps(widen(scale[g]));
    __m256 off = _mm256_mul_ps(s, _mm256_set1_ps(-8.f));
    for (int64_t j = 0; j < H; j += 8) {
      __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + g * H + j));
      __m128i lo = _mm_and_si128(b, _mm_set1_epi8(15));
      __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(15));
      __m256 wl = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), s, off);
      __m256 wh = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), s, off);
      const float* xg = x + g * G + j;
      for (int t = 0; t < T; ++t) {
        acc[t] = _mm256_fmadd_ps(wl, _mm256_loadu_ps(xg + t * I), acc[t]);
        acc[t] = _mm256_fmadd_ps(wh, _mm256_loadu_ps(xg + t * I + H), acc[t]);
      }
    }
  }
  for (int t = 0; t < T; ++t) y[t * O + o] = hsum256(acc[t]);
}
constexpr int64_t INT4_STEP = 16;
#endif

// One row, every token, plain loops: any CPU, any even group size.
inline void int4_row_portable(const uint8_t* row, const uint16_t* scale, const float* x, float* y, int64_t M, int64_t I,
                       int64_t O, int64_t G, int64_t o) {
  const int64_t H = G / 2, groups = I / G;
  for (int64_t m = 0; m < M; ++m) {
    float acc = 0;
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* b = row + g * H;
      const float* x0 = x + m * I + g * G;
      float part = 0;
#pragma omp simd reduction(+ : part)
      for (int64_t j = 0; j < H; ++j) part += float(int(b[j] & 15) - 8) * x0[j] + float(int(b[j] >> 4) - 8) * x0[j + H];
      acc += part * widen(scale[g]);
    }
    y[m * O + o] = acc;
  }
}

inline void int4_row(const uint8_t* p, const uint16_t* s, const float* x, float* y, int64_t M, int64_t I, int64_t O,
              int64_t G, int64_t o) {
  const uint8_t* row = p + o * (I / 2);
  const uint16_t* scale = s + o * (I / G);
#if defined(__AVX2__) && !defined(__AVX512F__)  // AVX-512 builds take R rows at a time (rows_q4)
  if (G % INT4_STEP == 0) {
    in_tiles(M, [&](auto T, int64_t m) {
      int4_tile<decltype(T)::value>(row, scale, x + m * I, y + m * O, I, O, G, o);
    });
    return;
  }
#endif
  int4_row_portable(row, scale, x, y, M, I, O, G, o);
}


// int4 rows [o0, o1): blocks of R rows with AVX-512, else one row at a time, the next prefetched meanwhile.
inline void rows_q4(const uint8_t* p, const uint16_t* s, const float* x, float* y, int64_t M, int64_t I, int64_t O,
                    int64_t G, int64_t o0, int64_t o1) {
#if defined(__AVX512F__)
  if (G % INT4_STEP == 0)
    for (; o0 + R <= o1; o0 += R) {
      prefetch_rows(p + (o0 + R) * (I / 2), std::min(R, o1 - o0 - R) * (I / 2));
      int64_t m = 0;
      for (; m + 2 <= M; m += 2) int4_tile_rows<2>(p, s, x + m * I, y + m * O, I, O, G, o0);
      if (m < M) int4_tile_rows<1>(p, s, x + m * I, y + m * O, I, O, G, o0);
    }
#endif
  for (int64_t o = o0; o < o1; ++o) {
    if (o + 1 < o1) prefetch_rows(p + (o + 1) * (I / 2), I / 2);
    int4_row(p, s, x, y, M, I, O, G, o);
  }
}

#if defined(__AVX512BF16__)
// bf16 tokens against int4 rows with VDPBF16PS, 32 weight pairs per instruction. A nibble u becomes a bf16 exactly
// by its bits: 0x4300 | u is 128 + u (bf16 keeps 7 fraction bits, so 128..255 are whole numbers). A group's sum
// is then s * (sum (128 + u) x - 136 sum x) = s * sum (u - 8) x, sum x taken by the same instruction against
// ones, once per token for the R rows. Needs G % 64 == 0.
template <int T, int RR = R>
void int4_tile_bf16(const uint8_t* p, const uint16_t* s, const uint16_t* x, float* y, int64_t I, int64_t O,
                    int64_t G, int64_t o) {
  constexpr int64_t GC = 64;  // groups whose scales are widened at a time, into sc (broadcast from memory)
  alignas(64) float sc[RR][GC];
  __m512 acc[RR][T];
  for (int r = 0; r < RR; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  const int64_t H = G / 2, groups = I / G;
  const __m512i bias = _mm512_set1_epi16(0x4300), ones = _mm512_set1_epi16(0x3f80);  // bf16 1.0
  const __m512i low = _mm512_set1_epi16(15);
  for (int64_t g0 = 0; g0 < groups; g0 += GC) {
    const int64_t gn = std::min(GC, groups - g0);
    for (int r = 0; r < RR; ++r)  // bf16 -> fp32, 16 scales at a time
      for (int64_t g = 0; g < gn; g += 16) {
        __mmask16 k = gn - g >= 16 ? 0xFFFF : __mmask16((1u << (gn - g)) - 1);
        __m256i b = _mm256_maskz_loadu_epi16(k, s + (o + r) * groups + g0 + g);
        _mm512_store_si512(&sc[r][g], _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
      }
    for (int64_t g = g0; g < g0 + gn; ++g) {
      const uint16_t* xg = x + g * G;
      __m512 gacc[RR][T];
      for (int t = 0; t < T; ++t) {  // each sum starts at -136 sum x (see above)
        __m512 xs = _mm512_setzero_ps();
        for (int64_t j = 0; j < G; j += 32)
          xs = _mm512_dpbf16_ps(xs, (__m512bh)ones, (__m512bh)_mm512_loadu_si512(xg + t * I + j));
        xs = _mm512_mul_ps(xs, _mm512_set1_ps(-136.f));
        for (int r = 0; r < RR; ++r) gacc[r][t] = xs;
      }
      for (int64_t j = 0; j < H; j += 32) {
        __m512bh xl[T], xh[T];
        for (int t = 0; t < T; ++t) {
          xl[t] = (__m512bh)_mm512_loadu_si512(xg + t * I + j);
          xh[t] = (__m512bh)_mm512_loadu_si512(xg + t * I + j + H);
        }
        for (int r = 0; r < RR; ++r) {
          // one byte per 16-bit lane; (lane & 15) | 0x4300 in one ternary-logic op (0xEA: (A & B) | C)
          const uint8_t* pb = p + (o + r) * (I / 2) + g * H + j;
          __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb)));
          __m512bh wl = (__m512bh)_mm512_ternarylogic_epi32(b, low, bias, 0xEA);
          __m512bh wh = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(b, 4), low, bias, 0xEA);
          for (int t = 0; t < T; ++t) {
            gacc[r][t] = _mm512_dpbf16_ps(gacc[r][t], wl, xl[t]);
            gacc[r][t] = _mm512_dpbf16_ps(gacc[r][t], wh, xh[t]);
          }
        }
      }
      for (int r = 0; r < RR; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = _mm512_fmadd_ps(gacc[r][t], _mm512_set1_ps(sc[r][g - g0]), acc[r][t]);
    }
  }
  for (int r = 0; r < RR; ++r)
    for (int t = 0; t < T; ++t) y[t * O + o + r] = _mm512_reduce_add_ps(acc[r][t]);
}
#endif

// Whether int4 rows of groups of G take bf16 tokens as they are (rows_q4 with uint16_t x) in this build.
constexpr bool int4_takes_bf16(int64_t G) {
#if defined(__AVX512BF16__)
  return G % 64 == 0;
#else
  return false;
#endif
}

// int4 rows [o0, o1) against bf16 tokens (int4_takes_bf16(G)); the last O % R rows through fp32.
inline void rows_q4(const uint8_t* p, const uint16_t* s, const uint16_t* x, float* y, int64_t M, int64_t I, int64_t O,
                    int64_t G, int64_t o0, int64_t o1) {
#if defined(__AVX512BF16__)
  if (M == 1)  // 8 rows at a time: more independent sums and streams in flight at one token
    for (; o0 + 2 * R <= o1; o0 += 2 * R) {
      prefetch_rows(p + (o0 + 2 * R) * (I / 2), std::min(2 * R, o1 - o0 - 2 * R) * (I / 2));
      int4_tile_bf16<1, 2 * R>(p, s, x, y, I, O, G, o0);
    }
  for (; o0 + R <= o1; o0 += R) {
    prefetch_rows(p + (o0 + R) * (I / 2), std::min(R, o1 - o0 - R) * (I / 2));
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) int4_tile_bf16<2>(p, s, x + m * I, y + m * O, I, O, G, o0);
    if (m < M) int4_tile_bf16<1>(p, s, x + m * I, y + m * O, I, O, G, o0);
  }
#endif
  if (o0 < o1) {
    std::vector<float> xf(M * I);
    for (int64_t i = 0; i < M * I; ++i) xf[i] = widen(x[i]);
    rows_q4(p, s, xf.data(), y, M, I, O, G, o0, o1);
  }
}

}  // namespace aetheris
