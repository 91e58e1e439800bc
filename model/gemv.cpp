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

#include <atomic>
#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

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

// x (M, I) fp32 or bf16 @ dequantized weight (O, I)^T -> (M, O) fp32; few rows only (model/int4.py dequantizes
// for more).
at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t group) {
  TORCH_CHECK(packed.dim() == 2 && packed.is_contiguous() && packed.scalar_type() == at::kByte, "int4: packed weight");
  TORCH_CHECK(scales.is_contiguous() && scales.scalar_type() == at::kBFloat16, "int4: bf16 scales");
  int64_t O = packed.size(0), I = packed.size(1) * 2, M = x.numel() / I;
  TORCH_CHECK(group % 2 == 0 && I % group == 0 && scales.numel() == O * (I / group), "int4: group of ", group);
  TORCH_CHECK(x.size(-1) == I && M <= MAX_ROWS, "int4: x has ", x.size(-1), " features and ", M, " rows");
  at::Tensor y = at::empty({M, O}, x.options().dtype(at::kFloat));
  auto p = packed.const_data_ptr<uint8_t>();
  auto s = reinterpret_cast<const uint16_t*>(scales.const_data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  if (x.scalar_type() == at::kBFloat16 && int4_takes_bf16(group)) {  // bf16 tokens as they are
    at::Tensor xc = x.contiguous();
    auto xp = reinterpret_cast<const uint16_t*>(xc.const_data_ptr<at::BFloat16>());
    at::parallel_for(0, (O + R - 1) / R, 1, [&](int64_t b0, int64_t b1) {
      rows_q4(p, s, xp, yp, M, I, O, group, b0 * R, std::min(b1 * R, O));
    });
    return y;
  }
  at::Tensor xf = x.to(at::kFloat).contiguous();  // (M, I): widened once, read by every row
  const float* xp = xf.const_data_ptr<float>();
  at::parallel_for(0, O, 16, [&](int64_t o0, int64_t o1) { rows_q4(p, s, xp, yp, M, I, O, group, o0, o1); });
  return y;
}

// x (M, I) fp32 or bf16 @ (q * scale)^T -> (M, O) fp32: q (O, I) int8, scale (O,) fp32; few rows only.
at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == at::kChar, "int8: weight");
  TORCH_CHECK(scale.is_contiguous() && scale.scalar_type() == at::kFloat && scale.numel() == q.size(0),
              "int8: one fp32 scale per row");
  int64_t O = q.size(0), I = q.size(1), M = x.numel() / I;
  TORCH_CHECK(x.size(-1) == I && M <= MAX_ROWS, "int8: x has ", x.size(-1), " features and ", M, " rows");
  at::Tensor xf = x.to(at::kFloat).contiguous();  // (M, I): widened once, read by every row
  at::Tensor y = at::empty({M, O}, x.options().dtype(at::kFloat));
  const int8_t* w = q.const_data_ptr<int8_t>();
  const float *s = scale.const_data_ptr<float>(), *xp = xf.const_data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (O + R - 1) / R, 1, [&](int64_t b0, int64_t b1) {
    rows_q8(w, s, xp, yp, M, I, O, b0 * R, std::min(b1 * R, O));
  });
  return y;
}

// packed (O, I/2), scales (O, I/G) -> the weight (O, I) in fp32 or bf16 (each value rounded once), one pass
// (prefill's GEMM reads it).
template <typename T>
void int4_dequant_rows(const uint8_t* p, const uint16_t* s, T* w, int64_t I, int64_t group, int64_t o0, int64_t o1) {
  const int64_t H = group / 2, groups = I / group;
  for (int64_t o = o0; o < o1; ++o)
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* b = p + o * (I / 2) + g * H;
      const float sc = widen(s[o * groups + g]);
      T* wg = w + o * I + g * group;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) {
        wg[j] = T(float(int(b[j] & 15) - 8) * sc);
        wg[j + H] = T(float(int(b[j] >> 4) - 8) * sc);
      }
    }
}

at::Tensor int4_dequant(const at::Tensor& packed, const at::Tensor& scales, int64_t group, at::ScalarType dtype) {
  TORCH_CHECK(packed.is_contiguous() && scales.is_contiguous() && scales.scalar_type() == at::kBFloat16, "int4");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "int4_dequant: float32 or bfloat16");
  const int64_t O = packed.size(0), I = packed.size(1) * 2;
  at::Tensor out = at::empty({O, I}, packed.options().dtype(dtype));
  auto p = packed.const_data_ptr<uint8_t>();
  auto s = reinterpret_cast<const uint16_t*>(scales.const_data_ptr<at::BFloat16>());
  at::parallel_for(0, O, 64, [&](int64_t o0, int64_t o1) {
    if (dtype == at::kFloat) int4_dequant_rows(p, s, out.data_ptr<float>(), I, group, o0, o1);
    else int4_dequant_rows(p, s, out.data_ptr<at::BFloat16>(), I, group, o0, o1);
  });
  return out;
}

// q (..., O, I) int8, scale (..., O) fp32 -> the weight in fp32 or bf16 (each value rounded once), one pass.
at::Tensor int8_dequant(const at::Tensor& q, const at::Tensor& scale, at::ScalarType dtype) {
  TORCH_CHECK(q.is_contiguous() && q.scalar_type() == at::kChar && scale.is_contiguous() &&
              scale.scalar_type() == at::kFloat && scale.numel() * q.size(-1) == q.numel(), "int8_dequant");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "int8_dequant: float32 or bfloat16");
  const int64_t I = q.size(-1), O = scale.numel();
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(dtype));
  const int8_t* w = q.const_data_ptr<int8_t>();
  const float* s = scale.const_data_ptr<float>();
  at::parallel_for(0, O, 64, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      const int8_t* row = w + o * I;
      const float sc = s[o];
      if (dtype == at::kFloat) {
        float* d = out.data_ptr<float>() + o * I;
#pragma omp simd
        for (int64_t i = 0; i < I; ++i) d[i] = float(row[i]) * sc;
      } else {
        at::BFloat16* d = out.data_ptr<at::BFloat16>() + o * I;
        for (int64_t i = 0; i < I; ++i) d[i] = at::BFloat16(float(row[i]) * sc);
      }
    }
  });
  return out;
}

// Which inner kernel serves int4 weights in this build (with bf16 tokens where it says avx512_bf16).
std::string int4_kernel() {
#if defined(__AVX512BF16__)
  return "avx512_bf16";
#elif defined(__AVX512F__)
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

// Flush denormal results to zero and read denormal inputs as zero (MXCSR's FTZ and DAZ bits) on every intra-op
// thread: the control register is per thread and torch.set_flush_denormal sets only its caller's. Returns the
// threads set; 0 where the CPU is not x86-64.
int64_t flush_denormals() {
#if defined(__x86_64__)
  std::atomic<int64_t> done{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t begin, int64_t end) {
    _mm_setcsr(_mm_getcsr() | 0x8040);
    done += end - begin;
  });
  return done;
#else
  return 0;
#endif
}

}  // namespace

TORCH_LIBRARY(AETHERIS_NS, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("bf16_kernel() -> str", &bf16_kernel);
  m.def("int4_mm(Tensor x, Tensor packed, Tensor scales, int group) -> Tensor");
  m.def("int4_kernel() -> str", &int4_kernel);
  m.def("int8_mm(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("int8_dequant(Tensor q, Tensor scale, ScalarType dtype) -> Tensor");
  m.def("int4_dequant(Tensor packed, Tensor scales, int group, ScalarType dtype) -> Tensor");
  m.def("flush_denormals() -> int", &flush_denormals);
}

TORCH_LIBRARY_IMPL(AETHERIS_NS, CPU, m) {
  m.impl("linear", &linear);
  m.impl("int4_mm", &int4_mm);
  m.impl("int8_mm", &int8_mm);
  m.impl("int8_dequant", &int8_dequant);
  m.impl("int4_dequant", &int4_dequant);
}
