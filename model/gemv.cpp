// Few-row products y = x W^T (+ b) that stream W once: the decode step's projections (model/gemv.py says why).
//
// Glossary: M rows of x (tokens), I in_features, O out_features; T tokens per tile.
//
// Each thread takes a contiguous range of weight-row blocks; a block's rows are read once from memory and every
// token of x is multiplied against them while they sit in L1, and the next block is prefetched meanwhile (the
// inner loops are in gemv_kernels.h). Products of more than MAX_ROWS rows (prefill) go to at::linear: there the
// arithmetic, not the weight stream, is the bound, and the BLAS kernels are built for it.
//
// The namespace is a macro so that tests can load builds for other instruction sets into one process.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "gemv_kernels.h"

#ifndef AETHERIS_NS
#define AETHERIS_NS aetheris_gemv
#endif

namespace {

using namespace aetheris;

constexpr int64_t MAX_ROWS = 16;  // rows of x served here; more go to at::linear

// x (..., I) @ weight (O, I)^T + bias -> (..., O), in x's dtype.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "gemv: weight must be a contiguous (O, I) matrix");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "gemv: x and weight must have one dtype");
  TORCH_CHECK(x.size(-1) == weight.size(1), "gemv: x has ", x.size(-1), " features, weight ", weight.size(1));
  int64_t I = weight.size(1), O = weight.size(0), M = x.numel() / I;
  if (M > MAX_ROWS) return at::linear(x, weight, bias);
  at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({M, O}, x.options().dtype(at::kFloat));  // (M, O) fp32 sums
  if (weight.scalar_type() == at::kFloat) {
    run(weight.const_data_ptr<float>(), xc.const_data_ptr<float>(), y.data_ptr<float>(), M, I, O);
  } else {
    TORCH_CHECK(weight.scalar_type() == at::kBFloat16, "gemv: weights must be float32 or bfloat16");
    auto w = reinterpret_cast<const uint16_t*>(weight.const_data_ptr<at::BFloat16>());
    auto xp = reinterpret_cast<const uint16_t*>(xc.const_data_ptr<at::BFloat16>());
    run(w, xp, y.data_ptr<float>(), M, I, O);
  }
  if (bias.has_value()) y.add_(*bias);
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = O;
  return y.to(x.scalar_type()).view(sizes);  // (..., O)
}

// ---------------------------------------------------------------- int4 weights (model/int4.py)
//
// packed (O, I/2) uint8 and scales (O, I/G) bf16: group g of row o is G weights; byte j of the group holds
// weight j in its low nibble and weight j + G/2 in its high one, each stored as q + 8 (q in [-8, 7]).
// x is widened to fp32 once per call. A row's group is unpacked once into scaled fp32 weights
// (s * (u - 8) as one FMA on u) and multiplied against every token of a tile of up to 4 while in registers, so
// the packed bytes are read once and the unpacking is shared by the tokens. AVX-512 and AVX2 forms, and a
// portable loop for other CPUs (and groups that are not a multiple of 32).

constexpr int64_t TT = 4;  // tokens per tile

#if defined(__AVX512F__)
// Tokens [t0, t0+T) of row o: 32-weight groups, 16 lanes.
template <int T>
void int4_tile(const uint8_t* row, const uint16_t* scale, const float* x, float* y, int64_t I, int64_t O,
               int64_t G, int64_t o) {
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  const int64_t H = G / 2, groups = I / G;
  for (int64_t g = 0; g < groups; ++g) {
    __m512 s = _mm512_set1_ps(widen(scale[g]));
    __m512 off = _mm512_mul_ps(s, _mm512_set1_ps(-8.f));
    for (int64_t j = 0; j < H; j += 16) {
      __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * H + j));
      __m128i lo = _mm_and_si128(b, _mm_set1_epi8(15));
      __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(15));
      __m512 wl = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), s, off);
      __m512 wh = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), s, off);
      const float* xg = x + g * G + j;
      for (int t = 0; t < T; ++t) {
        acc[t] = _mm512_fmadd_ps(wl, _mm512_loadu_ps(xg + t * I), acc[t]);
        acc[t] = _mm512_fmadd_ps(wh, _mm512_loadu_ps(xg + t * I + H), acc[t]);
      }
    }
  }
  for (int t = 0; t < T; ++t) y[t * O + o] = _mm512_reduce_add_ps(acc[t]);
}
constexpr int64_t INT4_STEP = 32;  // the group size the vector form needs a multiple of
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
void int4_row_portable(const uint8_t* row, const uint16_t* scale, const float* x, float* y, int64_t M, int64_t I,
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

void int4_row(const uint8_t* p, const uint16_t* s, const float* x, float* y, int64_t M, int64_t I, int64_t O,
              int64_t G, int64_t o) {
  const uint8_t* row = p + o * (I / 2);
  const uint16_t* scale = s + o * (I / G);
#if defined(__AVX512F__) || defined(__AVX2__)
  if (G % INT4_STEP == 0) {
    int64_t m = 0;
    for (; m + TT <= M; m += TT) int4_tile<TT>(row, scale, x + m * I, y + m * O, I, O, G, o);
    if (m + 2 <= M) int4_tile<2>(row, scale, x + m * I, y + m * O, I, O, G, o), m += 2;
    if (m < M) int4_tile<1>(row, scale, x + m * I, y + m * O, I, O, G, o);
    return;
  }
#endif
  int4_row_portable(row, scale, x, y, M, I, O, G, o);
}

// x (M, I) fp32 or bf16 @ dequantized weight (O, I)^T -> (M, O) fp32; few rows only (model/int4.py dequantizes
// for more).
at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t group) {
  TORCH_CHECK(packed.dim() == 2 && packed.is_contiguous() && packed.scalar_type() == at::kByte, "int4: packed weight");
  TORCH_CHECK(scales.is_contiguous() && scales.scalar_type() == at::kBFloat16, "int4: bf16 scales");
  int64_t O = packed.size(0), I = packed.size(1) * 2, M = x.numel() / I;
  TORCH_CHECK(group % 2 == 0 && I % group == 0 && scales.numel() == O * (I / group), "int4: group of ", group);
  TORCH_CHECK(x.size(-1) == I && M <= MAX_ROWS, "int4: x has ", x.size(-1), " features and ", M, " rows");
  at::Tensor xf = x.to(at::kFloat).contiguous();  // (M, I): widened once, read by every row
  at::Tensor y = at::empty({M, O}, x.options().dtype(at::kFloat));
  auto p = packed.const_data_ptr<uint8_t>();
  auto s = reinterpret_cast<const uint16_t*>(scales.const_data_ptr<at::BFloat16>());
  const float* xp = xf.const_data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, O, 16, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      if (o + 1 < o1) prefetch_rows(p + (o + 1) * (I / 2), I / 2);
      int4_row(p, s, xp, yp, M, I, O, group, o);
    }
  });
  return y;
}

// packed (O, I/2), scales (O, I/G) -> the weight (O, I) in fp32 or bf16, one pass (prefill's GEMM reads it).
at::Tensor int4_dequant(const at::Tensor& packed, const at::Tensor& scales, int64_t group, at::ScalarType dtype) {
  TORCH_CHECK(packed.is_contiguous() && scales.is_contiguous() && scales.scalar_type() == at::kBFloat16, "int4");
  int64_t O = packed.size(0), I = packed.size(1) * 2, H = group / 2, groups = I / group;
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "int4_dequant: float32 or bfloat16");
  at::Tensor out = at::empty({O, I}, packed.options().dtype(at::kFloat));
  auto p = packed.const_data_ptr<uint8_t>();
  auto s = reinterpret_cast<const uint16_t*>(scales.const_data_ptr<at::BFloat16>());
  float* w = out.data_ptr<float>();
  at::parallel_for(0, O, 64, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* b = p + o * (I / 2) + g * H;
        float sc = widen(s[o * groups + g]);
        float* wg = w + o * I + g * group;
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          wg[j] = float(int(b[j] & 15) - 8) * sc;
          wg[j + H] = float(int(b[j] >> 4) - 8) * sc;
        }
      }
  });
  return dtype == at::kFloat ? out : out.to(dtype);
}

// Which inner kernel serves int4 weights in this build.
std::string int4_kernel() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "portable";
#endif
}

// Which inner kernel serves bf16 weights in this build (the tests check each build took the one it should).
std::string bf16_kernel() {
#if defined(__AVX512BF16__)
  return "avx512_bf16";
#else
  return "portable";
#endif
}

}  // namespace

TORCH_LIBRARY(AETHERIS_NS, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("bf16_kernel() -> str", &bf16_kernel);
  m.def("int4_mm(Tensor x, Tensor packed, Tensor scales, int group) -> Tensor");
  m.def("int4_kernel() -> str", &int4_kernel);
  m.def("int4_dequant(Tensor packed, Tensor scales, int group, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(AETHERIS_NS, CPU, m) {
  m.impl("linear", &linear);
  m.impl("int4_mm", &int4_mm);
  m.impl("int4_dequant", &int4_dequant);
}
