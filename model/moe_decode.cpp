// An MoE layer's decode step in one call: the chosen experts of every token and the shared expert, each
// expert's weights streamed once for all the tokens routed to it (model/moe.py, `MoE.step`, says why).
//
// Glossary: T tokens (one per sequence), D d_model, k experts per token, E experts, F an expert's hidden size,
// A = T * k assignments, S segments: the used experts in id order, then the shared expert (every token, weight 1).
//
// Two parallel passes over weight-row blocks, each split among the threads (gemv_kernels.h's inner loops):
//  1. gate / up: for every segment and block of its F rows, the products of the segment's tokens, then
//     h = silu(gate) * up (relu(up)^2 without a gate) in fp32, the down product's input;
//  2. down: for every block of D output rows, each segment's products, then each token's rows summed with its
//     routing weights in fp32: a thread owns its output rows, so nothing is shared between threads.
// Between the passes every h is complete; the result is cast to x's dtype once.
//
// Weights come in one of four formats, all matrices of a call in the same one: fp32 or bf16 (x in that dtype, h
// rounded to it), int8 with a scale per row or int4 with a scale per group (model/quantized.py, model/int4.py;
// x fp32 or bf16, widened once, h kept in fp32; int4 takes bf16 x as it is where the build can, h in bf16).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "gemv_kernels.h"

#ifndef AETHERIS_NS
#define AETHERIS_NS aetheris_gemv
#endif

namespace {

using namespace aetheris;

enum class Format { F32, BF16, Q8, Q4 };

struct Mat {  // one (O, I) matrix of an expert: weights, scales (quantized formats), inputs per scale (int4)
  const void *w = nullptr, *s = nullptr;
  int64_t group = 0;
};

struct Segment {
  Mat gate, up, down;         // (F, D), (F, D), (D, F); gate.w null for relu^2 experts
  int64_t F, first, n;        // rows [first, first + n) of the gathered tokens and of h
  int64_t h;                  // offset of this segment's h (n, F) in the h buffer
};

inline float silu(float v) { return v / (1.f + std::exp(-v)); }

inline void store(float v, float* p) { *p = v; }
inline void store(float v, uint16_t* p) { *p = c10::BFloat16(v).x; }  // round to nearest even

// y (M, O) rows [o0, o1) = x (M, I) m^T, x of the activation type X (bf16 bits: bf16 weights, or int4 weights
// that take bf16 tokens as they are; else fp32).
template <typename X>
void product(Format f, const Mat& m, const X* x, float* y, int64_t M, int64_t I, int64_t O, int64_t o0, int64_t o1) {
  auto q4 = [&] { return static_cast<const uint8_t*>(m.w); };
  auto q4_scales = [&] { return static_cast<const uint16_t*>(m.s); };
  if constexpr (std::is_same_v<X, uint16_t>) {
    if (f == Format::Q4) return rows_q4(q4(), q4_scales(), x, y, M, I, O, m.group, o0, o1);
    rows(static_cast<const uint16_t*>(m.w), x, y, M, I, O, o0, o1);
  } else if (f == Format::F32) {
    rows(static_cast<const float*>(m.w), x, y, M, I, O, o0, o1);
  } else if (f == Format::Q8) {
    rows_q8(static_cast<const int8_t*>(m.w), static_cast<const float*>(m.s), x, y, M, I, O, o0, o1);
  } else {
    rows_q4(q4(), q4_scales(), x, y, M, I, O, m.group, o0, o1);
  }
}

template <typename X>
void gate_up(Format f, const Segment& s, const X* xs, float* g, float* u, X* h, int64_t D, int64_t o0, int64_t o1) {
  const X* x = xs + s.first * D;
  product(f, s.up, x, u, s.n, D, s.F, o0, o1);  // (n, F) rows [o0, o1)
  if (s.gate.w) product(f, s.gate, x, g, s.n, D, s.F, o0, o1);
  for (int64_t m = 0; m < s.n; ++m)
    for (int64_t o = o0; o < o1; ++o) {
      float up = u[m * s.F + o];
      store(s.gate.w ? silu(g[m * s.F + o]) * up : std::max(up, 0.f) * std::max(up, 0.f), h + s.h + m * s.F + o);
    }
}

// The two passes; xs (rows, D) gathered tokens of type X -> (T, D) fp32 sums.
template <typename X>
at::Tensor run_moe(Format f, const std::vector<Segment>& segs, const X* xs, const int64_t* token, const float* weight,
                   int64_t T, int64_t D, int64_t rows_total, int64_t h_total, const at::TensorOptions& opt) {
  auto fp32 = opt.dtype(at::kFloat);
  at::Tensor g = at::empty({h_total}, fp32), u = at::empty({h_total}, fp32);
  at::Tensor hb = at::empty({h_total * int64_t(sizeof(X))}, opt.dtype(at::kByte));
  at::Tensor ys = at::empty({rows_total, D}, fp32);
  at::Tensor out = at::zeros({T, D}, fp32);
  X* h = reinterpret_cast<X*>(hb.data_ptr());
  float *gb = g.data_ptr<float>(), *ub = u.data_ptr<float>(), *yb = ys.data_ptr<float>(), *ob = out.data_ptr<float>();
  std::vector<std::pair<int64_t, int64_t>> work;  // pass 1: (segment, first row of a block of 2R rows)
  for (int64_t i = 0; i < int64_t(segs.size()); ++i)
    for (int64_t o = 0; o < segs[i].F; o += 2 * R) work.emplace_back(i, o);
  at::parallel_for(0, int64_t(work.size()), 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const Segment& s = segs[work[w].first];
      int64_t o = work[w].second;
      gate_up(f, s, xs, gb + s.h, ub + s.h, h, D, o, std::min(o + 2 * R, s.F));
    }
  });
  at::parallel_for(0, (D + R - 1) / R, 1, [&](int64_t b0, int64_t b1) {
    int64_t o0 = b0 * R, o1 = std::min(b1 * R, D);
    for (const Segment& s : segs) product(f, s.down, h + s.h, yb + s.first * D, s.n, s.F, D, o0, o1);
    for (int64_t a = 0; a < rows_total; ++a)
      for (int64_t o = o0; o < o1; ++o) ob[token[a] * D + o] += weight[a] * yb[a * D + o];
  });
  return out;
}

Format format_of(const at::Tensor& w) {
  switch (w.scalar_type()) {
    case at::kFloat: return Format::F32;
    case at::kBFloat16: return Format::BF16;
    case at::kChar: return Format::Q8;
    case at::kByte: return Format::Q4;
    default: TORCH_CHECK(false, "moe_decode: weights must be float32, bfloat16, int8 or int4 (uint8), not ",
                         w.scalar_type());
  }
}

// The three matrices of a list [gate, up, down] (plain) or [gate, gate scales, up, up scales, down, down
// scales] (quantized), gate entries none for relu^2 experts; expert e's (stacked: E leading) or the only one.
struct Operands {
  std::optional<at::Tensor> w[3], s[3];
  bool stacked;

  Operands(const std::vector<std::optional<at::Tensor>>& list, Format f, bool stacked_) : stacked(stacked_) {
    const size_t arity = (f == Format::F32 || f == Format::BF16) ? 1 : 2;
    TORCH_CHECK(list.size() == 3 * arity, "moe_decode: ", 3 * arity, " weight tensors per expert set, not ",
                list.size());
    for (int i = 0; i < 3; ++i) {
      w[i] = list[i * arity];
      if (arity == 2) s[i] = list[i * arity + 1];
      TORCH_CHECK(i == 0 || w[i], "moe_decode: up and down weights are required");
      if (!w[i]) continue;
      TORCH_CHECK(w[i]->is_contiguous() && format_of(*w[i]) == f, "moe_decode: experts of one format, contiguous");
      if (arity == 1) continue;
      const int64_t rows = w[i]->numel() / w[i]->size(-1);
      const int64_t per_row = s[i] ? s[i]->numel() / std::max<int64_t>(rows, 1) : 0;
      TORCH_CHECK(s[i] && s[i]->is_contiguous() && s[i]->numel() == rows * per_row && s[i]->size(0) == w[i]->size(0),
                  "moe_decode: quantized weights need their scales");
      const bool q4_groups = per_row > 0 && in_features(i) % per_row == 0 && (in_features(i) / per_row) % 2 == 0;
      TORCH_CHECK(f == Format::Q8 ? s[i]->scalar_type() == at::kFloat && per_row == 1
                                  : s[i]->scalar_type() == at::kBFloat16 && q4_groups,
                  "moe_decode: int8 takes one fp32 scale per row, int4 one bf16 scale per even group");
    }
  }

  int64_t in_features(int i) const {  // I of matrix i: int4 packs two weights to a byte
    return w[i]->size(-1) * (w[i]->scalar_type() == at::kByte ? 2 : 1);
  }

  Mat mat(int i, int64_t e) const {
    if (!w[i]) return {};
    auto at_e = [&](const at::Tensor& t) {
      return static_cast<const char*>(t.const_data_ptr()) + (stacked ? e * t.stride(0) * t.element_size() : 0);
    };
    Mat m{at_e(*w[i]), s[i] ? at_e(*s[i]) : nullptr, 0};
    if (s[i] && w[i]->scalar_type() == at::kByte) m.group = 2 * w[i]->size(-1) / s[i]->size(-1);
    return m;
  }

  int64_t hidden() const { return w[1]->size(-2); }  // F: up's output rows

  bool int4_takes_bf16() const {  // every matrix's groups fit the bf16-token int4 kernel
    for (int i = 0; i < 3; ++i)
      if (w[i] && !aetheris::int4_takes_bf16(mat(i, 0).group)) return false;
    return true;
  }
};

// x (T, D), experts / weights (T, k) -> (T, D) in x's dtype: sum_j weights[t, j] * expert_{experts[t, j]}(x[t])
// + shared(x[t]). routed: gate (E, F, D) or none (relu^2 experts), up (E, F, D), down (E, D, F), each with its
// scales when quantized (Operands); shared: the shared expert's (Fs, D), (Fs, D), (D, Fs) in the same format
// and gating, or an empty list.
at::Tensor moe_decode(const at::Tensor& x, const at::Tensor& experts, const at::Tensor& weights,
                      const std::vector<std::optional<at::Tensor>>& routed,
                      const std::vector<std::optional<at::Tensor>>& shared) {
  TORCH_CHECK(routed.size() >= 3 && routed[routed.size() / 3], "moe_decode: the routed experts' weights");
  const Format f = format_of(*routed[routed.size() / 3]);
  const Operands ops(routed, f, true);
  const int64_t T = x.size(0), D = x.size(1), k = experts.size(1), E = ops.w[1]->size(0), F = ops.hidden();
  TORCH_CHECK(x.dim() == 2 && experts.sizes() == weights.sizes() && experts.size(0) == T, "moe_decode: shapes");
  TORCH_CHECK(experts.scalar_type() == at::kLong && weights.scalar_type() == at::kFloat, "moe_decode: routing");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "moe_decode: fp32 or bf16");
  TORCH_CHECK(f == Format::Q8 || f == Format::Q4 || x.scalar_type() == ops.w[1]->scalar_type(),
              "moe_decode: experts in x's dtype");
  TORCH_CHECK(ops.w[2]->size(1) == D && ops.w[2]->size(0) == E && ops.in_features(1) == D && ops.in_features(2) == F &&
                  (!ops.w[0] || ops.w[0]->sizes() == ops.w[1]->sizes()),
              "moe_decode: expert shapes");
  // Activations: bf16 as its bits for bf16 weights and for int4 ones that take bf16 tokens, else fp32 (the
  // other quantized kernels widen x once).
  std::optional<Operands> sh;
  if (!shared.empty()) sh.emplace(shared, f, false);
  const bool bits = f == Format::BF16 || (f == Format::Q4 && x.scalar_type() == at::kBFloat16 &&
                                          ops.int4_takes_bf16() && (!sh || sh->int4_takes_bf16()));
  const at::ScalarType xt = bits ? at::kBFloat16 : at::kFloat;
  const int64_t esz = bits ? 2 : 4;

  at::Tensor ex = experts.contiguous().cpu(), wt = weights.contiguous();
  const int64_t* ep = ex.const_data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> assigned(E);  // assignments of each expert, in token order
  for (int64_t a = 0; a < T * k; ++a) {
    TORCH_CHECK(ep[a] >= 0 && ep[a] < E, "moe_decode: expert id ", ep[a], " of ", E);
    assigned[ep[a]].push_back(a);
  }
  const bool has_shared = sh.has_value();
  const int64_t rows_total = T * k + (has_shared ? T : 0);
  std::vector<int64_t> token(rows_total);  // per gathered row: its token
  std::vector<float> weight(rows_total, 1.f);
  std::vector<Segment> segs;
  int64_t row = 0, h_total = 0;
  for (int64_t e = 0; e < E; ++e) {
    if (assigned[e].empty()) continue;
    segs.push_back({ops.mat(0, e), ops.mat(1, e), ops.mat(2, e), F, row, int64_t(assigned[e].size()), h_total});
    for (int64_t a : assigned[e]) token[row] = a / k, weight[row] = wt.const_data_ptr<float>()[a], ++row;
    h_total += segs.back().n * F;
  }
  if (has_shared) {
    const int64_t Fs = sh->hidden();
    const bool same_gating = sh->w[0].has_value() == ops.w[0].has_value();
    TORCH_CHECK(sh->w[2]->size(0) == D && sh->in_features(1) == D && sh->in_features(2) == Fs && same_gating &&
                    (!sh->w[0] || sh->w[0]->sizes() == sh->w[1]->sizes()),
                "moe_decode: shared expert");
    segs.push_back({sh->mat(0, 0), sh->mat(1, 0), sh->mat(2, 0), Fs, row, T, h_total});
    for (int64_t t = 0; t < T; ++t) token[row] = t, ++row;
    h_total += T * Fs;
  }
  at::Tensor xc = x.to(xt).contiguous(), xs = at::empty({rows_total, D}, x.options().dtype(xt));  // (rows, D)
  for (int64_t r = 0; r < rows_total; ++r)
    std::memcpy(static_cast<char*>(xs.data_ptr()) + r * D * esz,
                static_cast<const char*>(xc.const_data_ptr()) + token[r] * D * esz, D * esz);

  at::Tensor out = bits ? run_moe(f, segs, reinterpret_cast<const uint16_t*>(xs.const_data_ptr()), token.data(),
                                  weight.data(), T, D, rows_total, h_total, x.options())
                        : run_moe(f, segs, xs.const_data_ptr<float>(), token.data(), weight.data(), T, D, rows_total,
                                  h_total, x.options());  // (T, D) fp32 sums
  return out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(AETHERIS_NS, m) {
  m.def("moe_decode(Tensor x, Tensor experts, Tensor weights, Tensor?[] routed, Tensor?[] shared) -> Tensor");
}

TORCH_LIBRARY_IMPL(AETHERIS_NS, CPU, m) { m.impl("moe_decode", &moe_decode); }
