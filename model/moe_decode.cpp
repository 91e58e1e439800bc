// An MoE layer's decode step in one call: the chosen experts of every token and the shared expert, each
// expert's weights streamed once for all the tokens routed to it (model/moe.py, `MoE.step`, says why).
//
// Glossary: T tokens (one per sequence), D d_model, k experts per token, E experts, F an expert's hidden size,
// A = T * k assignments, S segments: the used experts in id order, then the shared expert (every token, weight 1).
//
// Two parallel passes over weight-row blocks, each split among the threads (gemv_kernels.h's inner loops):
//  1. gate / up: for every segment and block of its F rows, the products of the segment's tokens, then
//     h = silu(gate) * up (relu(up)^2 without a gate) in fp32, rounded to the weights' dtype as the down
//     product's input;
//  2. down: for every block of D output rows, each segment's products, then each token's rows summed with its
//     routing weights in fp32: a thread owns its output rows, so nothing is shared between threads.
// Between the passes every h is complete; the result is cast to x's dtype once.

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

struct Segment {
  const void *gate, *up, *down;  // (F, D), (F, D), (D, F) in the weights' dtype; gate null for relu^2 experts
  int64_t F, first, n;        // rows [first, first + n) of the gathered tokens and of h
  int64_t h;                  // offset of this segment's h (n, F) in the h buffer
};

inline float silu(float v) { return v / (1.f + std::exp(-v)); }

inline void store(float v, float* p) { *p = v; }
inline void store(float v, uint16_t* p) { *p = c10::BFloat16(v).x; }  // round to nearest even

template <typename W>
void gate_up(const Segment& s, const W* xs, float* g, float* u, W* h, int64_t D, int64_t o0, int64_t o1) {
  const W* x = xs + s.first * D;
  rows(static_cast<const W*>(s.up), x, u, s.n, D, s.F, o0, o1);  // (n, F) rows [o0, o1)
  if (s.gate) rows(static_cast<const W*>(s.gate), x, g, s.n, D, s.F, o0, o1);
  for (int64_t m = 0; m < s.n; ++m)
    for (int64_t o = o0; o < o1; ++o) {
      float up = u[m * s.F + o];
      store(s.gate ? silu(g[m * s.F + o]) * up : std::max(up, 0.f) * std::max(up, 0.f), h + s.h + m * s.F + o);
    }
}

template <typename W>
at::Tensor run_moe(const std::vector<Segment>& segs, const W* xs, const int64_t* token, const float* weight,
                   int64_t T, int64_t D, int64_t rows_total, int64_t h_total, const at::TensorOptions& opt) {
  at::Tensor g = at::empty({h_total}, opt.dtype(at::kFloat)), u = at::empty({h_total}, opt.dtype(at::kFloat));
  at::Tensor hb = at::empty({h_total}, opt), ys = at::empty({rows_total, D}, opt.dtype(at::kFloat));
  at::Tensor out = at::zeros({T, D}, opt.dtype(at::kFloat));
  W* h = reinterpret_cast<W*>(hb.data_ptr());
  float *gb = g.data_ptr<float>(), *ub = u.data_ptr<float>(), *yb = ys.data_ptr<float>(), *ob = out.data_ptr<float>();
  std::vector<std::pair<int64_t, int64_t>> work;  // pass 1: (segment, first row of an R-row block)
  for (int64_t i = 0; i < int64_t(segs.size()); ++i)
    for (int64_t o = 0; o < segs[i].F; o += R) work.emplace_back(i, o);
  at::parallel_for(0, int64_t(work.size()), 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const Segment& s = segs[work[w].first];
      int64_t o = work[w].second;
      gate_up(s, xs, gb + s.h, ub + s.h, h, D, o, std::min(o + R, s.F));
    }
  });
  at::parallel_for(0, (D + R - 1) / R, 1, [&](int64_t b0, int64_t b1) {
    int64_t o0 = b0 * R, o1 = std::min(b1 * R, D);
    for (const Segment& s : segs) rows(static_cast<const W*>(s.down), h + s.h, yb + s.first * D, s.n, s.F, D, o0, o1);
    for (int64_t a = 0; a < rows_total; ++a)
      for (int64_t o = o0; o < o1; ++o) ob[token[a] * D + o] += weight[a] * yb[a * D + o];
  });
  return out;
}

// x (T, D), experts / weights (T, k) -> (T, D) in x's dtype: sum_j weights[t, j] * expert_{experts[t, j]}(x[t])
// + shared(x[t]). gate (E, F, D) or none (relu^2 experts), up (E, F, D), down (E, D, F); the shared expert's
// (Fs, D), (Fs, D), (D, Fs), gated as the routed ones, or none.
at::Tensor moe_decode(const at::Tensor& x, const at::Tensor& experts, const at::Tensor& weights,
                      const std::optional<at::Tensor>& gate, const at::Tensor& up, const at::Tensor& down,
                      const std::optional<at::Tensor>& shared_gate, const std::optional<at::Tensor>& shared_up,
                      const std::optional<at::Tensor>& shared_down) {
  const int64_t T = x.size(0), D = x.size(1), k = experts.size(1), E = up.size(0), F = up.size(1);
  TORCH_CHECK(x.dim() == 2 && experts.sizes() == weights.sizes() && experts.size(0) == T, "moe_decode: shapes");
  TORCH_CHECK(experts.scalar_type() == at::kLong && weights.scalar_type() == at::kFloat, "moe_decode: routing");
  TORCH_CHECK(x.scalar_type() == up.scalar_type() && up.is_contiguous() && down.is_contiguous(), "moe_decode: experts");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "moe_decode: fp32 or bf16");
  TORCH_CHECK(up.size(2) == D && down.size(1) == D && down.size(2) == F, "moe_decode: expert shapes");
  TORCH_CHECK(!gate || (gate->is_contiguous() && gate->sizes() == up.sizes()), "moe_decode: gate");
  using Bits = uint16_t;  // bf16 as its bits, which the inner loops take
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const int64_t esz = bf16 ? 2 : 4;
  auto ptr = [&](const at::Tensor& t, int64_t offset) { return static_cast<const char*>(t.const_data_ptr()) + offset * esz; };

  at::Tensor ex = experts.contiguous().cpu(), wt = weights.contiguous();
  const int64_t* ep = ex.const_data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> routed(E);  // assignments of each expert, in token order
  for (int64_t a = 0; a < T * k; ++a) {
    TORCH_CHECK(ep[a] >= 0 && ep[a] < E, "moe_decode: expert id ", ep[a], " of ", E);
    routed[ep[a]].push_back(a);
  }
  const bool has_shared = shared_up.has_value();
  const int64_t rows_total = T * k + (has_shared ? T : 0);
  std::vector<int64_t> token(rows_total);  // per gathered row: its token
  std::vector<float> weight(rows_total, 1.f);
  std::vector<Segment> segs;
  int64_t row = 0, h_total = 0;
  for (int64_t e = 0; e < E; ++e) {
    if (routed[e].empty()) continue;
    segs.push_back({gate ? ptr(*gate, e * F * D) : nullptr, ptr(up, e * F * D), ptr(down, e * D * F), F, row,
                   int64_t(routed[e].size()), h_total});
    for (int64_t a : routed[e]) token[row] = a / k, weight[row] = wt.const_data_ptr<float>()[a], ++row;
    h_total += segs.back().n * F;
  }
  if (has_shared) {
    const int64_t Fs = shared_up->size(0);
    TORCH_CHECK(shared_up->is_contiguous() && shared_down->is_contiguous() && shared_up->size(1) == D &&
                shared_down->size(0) == D && shared_down->size(1) == Fs && gate.has_value() == shared_gate.has_value(),
                "moe_decode: shared expert");
    segs.push_back({shared_gate ? ptr(*shared_gate, 0) : nullptr, ptr(*shared_up, 0), ptr(*shared_down, 0), Fs, row,
                   T, h_total});
    for (int64_t t = 0; t < T; ++t) token[row] = t, ++row;
    h_total += T * Fs;
  }
  at::Tensor xc = x.contiguous(), xs = at::empty({rows_total, D}, x.options());  // (rows, D) gathered tokens
  for (int64_t r = 0; r < rows_total; ++r)
    std::memcpy(static_cast<char*>(xs.data_ptr()) + r * D * esz, ptr(xc, token[r] * D), D * esz);

  auto typed = [&](auto zero) {
    using W = decltype(zero);
    return run_moe<W>(segs, reinterpret_cast<const W*>(xs.const_data_ptr()), token.data(), weight.data(), T, D,
                      rows_total, h_total, x.options());
  };
  at::Tensor out = bf16 ? typed(Bits{}) : typed(float{});  // (T, D) fp32 sums
  return out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(AETHERIS_NS, m) {
  m.def("moe_decode(Tensor x, Tensor experts, Tensor weights, Tensor? gate, Tensor up, Tensor down, "
        "Tensor? shared_gate, Tensor? shared_up, Tensor? shared_down) -> Tensor");
}

TORCH_LIBRARY_IMPL(AETHERIS_NS, CPU, m) { m.impl("moe_decode", &moe_decode); }
