// CPU kernels for the two hand-written autograd nodes of bknbench/kernels/fused.py:
//   group_normalize: per-group moments -> optional Kalman fusion with a prediction -> normalize
//   relu_affine:     moments after ReLU then a linear or convolution layer
// Same inputs, outputs and gradients as the Python nodes `fused.GroupNormalize` and
// `fused._ReluAffine`; tests check both against the reference formulas.
//
// Why C++: at micro-batch sizes BKN's cost is the number of small tensor ops (about 150 per
// layer and step from Python, each a dispatch and often an allocation), not arithmetic. Here
// a layer is one call forward and one backward: three passes over the activations forward
// (sum, squared deviations, normalize) and two backward (two sums, the gradient), as torch's
// batch norm takes, and the per-(group, channel) math in plain loops.
// Layout: x is (N, C, P) contiguous, group g holds samples [g B, (g + 1) B), B = N / G;
// statistics are (G, C), index g * C + c, accumulated in double.
//
// Threads: the passes over the activations are split over independent units, (group,
// channel) pairs for the sums and (sample, channel) rows for the elementwise passes, on
// ATen's intra-op pool (at::parallel_for: torch.set_num_threads; below a grain of work a
// call runs inline, so tiny problems pay no thread start-up). Every sum belongs to one unit
// and is taken in one thread in a fixed order, and the sums across units (the guard's mean,
// the weight, bias and gain gradients) run after, in one thread: results are bitwise the
// same for any thread count (tests/kernels/test_native.py).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr double kVarFloor = 1e-12;  // transitions._VAR_FLOOR
constexpr int64_t kChunk = 1024;     // values summed in the input's precision before double
constexpr int64_t kGrain = 32768;    // values a task takes at least (ATen's own grain size)

// f(lo, hi) over [0, units), units costing about `cost` values each, split over torch's
// intra-op threads into ranges of at least kGrain values; below that, one inline call (not
// even at::parallel_for's thread bookkeeping). The bodies capture raw pointers by value:
// through references to vectors gcc reloads and stores every step (kernel_sums ran 3x slower).
template <typename F>
void for_each_range(int64_t units, int64_t cost, const F& f) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, cost));
  if (units <= grain) {
    if (units > 0) f(int64_t(0), units);
    return;
  }
  at::parallel_for(0, units, grain, f);
}

// f(u) for every unit u, split as for_each_range.
template <typename F>
void for_each_unit(int64_t units, int64_t cost, const F& f) {
  for_each_range(units, cost, [&](int64_t lo, int64_t hi) {
    for (int64_t u = lo; u < hi; ++u) f(u);
  });
}

struct Dims {
  int64_t n, c, p, g, b;  // samples, channels, positions, groups, samples per group
  double count() const { return double(b * p); }
};

Dims dims_of(const Tensor& x, int64_t groups) {
  TORCH_CHECK(x.dim() >= 2 && groups > 0 && x.size(0) % groups == 0,
              "group_normalize: input (N, C, ...) with N divisible by ", groups, " groups, got ",
              x.sizes());
  const int64_t n = x.size(0), c = x.size(1);
  const int64_t p = n * c ? x.numel() / (n * c) : 0;
  return {n, c, p, groups, n / groups};
}

// The data of an optional tensor (undefined: null) and its i-th value (null: 0).
template <typename T>
const T* ptr(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
double value_at(const T* p, int64_t i) {
  return p ? double(p[i]) : 0.0;
}

// Sum of f(i) over [0, len) in chunks: vectorized in T inside a chunk, double across chunks.
template <typename T, typename F>
double row_sum(int64_t len, F f) {
  double total = 0;
  for (int64_t lo = 0; lo < len; lo += kChunk) {
    const int64_t hi = std::min(len, lo + kChunk);
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = lo; i < hi; ++i) acc += f(i);
    total += acc;
  }
  return total;
}

// The (g, c) units [lo, hi) group by group: f(g, c0, c1) for the channels [c0, c1) of g.
// A body visits a group's samples in order, and in each the channels' rows, which lie side
// by side: the memory is read in order, and every (g, c) sums its rows in sample order.
template <typename F>
void channel_blocks(const Dims& d, int64_t lo, int64_t hi, const F& f) {
  for (int64_t g = lo / d.c; g * d.c < hi; ++g) {
    f(g, std::max(lo - g * d.c, int64_t(0)), std::min(hi - g * d.c, d.c));
  }
}

// Per (g, c): observed mean m and biased variance s, two passes as torch's batch norm.
template <typename T>
void observe(const T* x, const Dims& d, T* m, T* s) {
  std::vector<double> acc_v(d.g * d.c, 0.0);  // per (g, c) sums, in double
  double* acc = acc_v.data();
  for_each_range(d.g * d.c, 2 * d.b * d.p, [=](int64_t lo, int64_t hi) {
    channel_blocks(d, lo, hi, [=](int64_t g, int64_t c0, int64_t c1) {
      double* sum = acc + g * d.c;
      for (int64_t n = g * d.b; n < (g + 1) * d.b; ++n) {
        for (int64_t c = c0; c < c1; ++c) {
          const T* row = x + (n * d.c + c) * d.p;
          sum[c] += row_sum<T>(d.p, [row](int64_t i) { return row[i]; });
        }
      }
      for (int64_t c = c0; c < c1; ++c) {
        m[g * d.c + c] = T(sum[c] / d.count());
        sum[c] = 0.0;
      }
      for (int64_t n = g * d.b; n < (g + 1) * d.b; ++n) {
        for (int64_t c = c0; c < c1; ++c) {
          const T* row = x + (n * d.c + c) * d.p;
          const T mt = m[g * d.c + c];
          sum[c] += row_sum<T>(d.p, [row, mt](int64_t i) { T v = row[i] - mt; return v * v; });
        }
      }
      for (int64_t c = c0; c < c1; ++c) s[g * d.c + c] = T(sum[c] / d.count());
    });
  });
}

// out[n, c, :] = a[g, c] * u[n, c, :] + b[g, c] * v[n, c, :] + k[g, c]; u may be null.
template <typename T>
void combine(const T* u, const T* v, const Dims& d, const std::vector<double>& a_v,
             const std::vector<double>& b_v, const std::vector<double>& k_v, T* out) {
  const double *a = a_v.data(), *b = b_v.data(), *k = k_v.data();
  for_each_range(d.n * d.c, d.p, [=](int64_t lo, int64_t hi) {  // rows n * C + c
    int64_t n = lo / d.c, c = lo % d.c, gc0 = n / d.b * d.c;  // gc0: row (g, 0) of the stats
    for (int64_t row = lo; row < hi; ++row) {
      const int64_t gc = gc0 + c, off = row * d.p;
      const T ta = T(a[gc]), tb = T(b[gc]), tk = T(k[gc]);
      const T* vr = v + off;
      T* o = out + off;
      if (u) {
        const T* ur = u + off;
#pragma omp simd
        for (int64_t i = 0; i < d.p; ++i) o[i] = ta * ur[i] + tb * vr[i] + tk;
      } else {
#pragma omp simd
        for (int64_t i = 0; i < d.p; ++i) o[i] = tb * vr[i] + tk;
      }
      if (++c == d.c) {
        c = 0;
        gc0 = ++n / d.b * d.c;
      }
    }
  });
}

// ------------------------------------------------------------------ group_normalize
// Inputs: x (N, C, *S); mu_hat, var_hat (G, C) or undefined (no prediction: per-group BN);
// p_tensor (0-d, a learnable gain) or undefined, then p_value is the weight on the
// prediction; weight, bias (C,); guard_per_group: one guard decision per group from its
// own channel average instead of one over all groups (reference.trusted).
// Outputs: y (N, C, *S); m, s (observed); mu, var (used).
struct GroupNormalize : public torch::autograd::Function<GroupNormalize> {
  static variable_list forward(AutogradContext* ctx, Tensor x, std::optional<Tensor> mu_hat_opt,
                               std::optional<Tensor> var_hat_opt,
                               std::optional<Tensor> p_opt, double p_value, Tensor weight,
                               Tensor bias, int64_t groups, double guard, double eps,
                               bool guard_per_group) {
    const Tensor mu_hat = mu_hat_opt.value_or(Tensor()), var_hat = var_hat_opt.value_or(Tensor());
    const Tensor p_tensor = p_opt.value_or(Tensor());
    const Tensor xc = x.contiguous();
    const Dims d = dims_of(xc, groups);
    const auto opts = xc.options();
    Tensor y = at::empty(xc.sizes(), opts);
    Tensor m = at::empty({d.g, d.c}, opts), s = at::empty({d.g, d.c}, opts);
    Tensor mu = at::empty({d.g, d.c}, opts), var = at::empty({d.g, d.c}, opts);
    const bool prior = mu_hat.defined();
    std::vector<double> pe(groups, 0.0);  // the weight on the prediction per group, guarded
    AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "bknbench_group_normalize", [&] {
      const int64_t gc_n = d.g * d.c;
      observe<scalar_t>(xc.data_ptr<scalar_t>(), d, m.data_ptr<scalar_t>(),
                        s.data_ptr<scalar_t>());
      const scalar_t* m_ = m.data_ptr<scalar_t>();
      const scalar_t* s_ = s.data_ptr<scalar_t>();
      scalar_t* mu_ = mu.data_ptr<scalar_t>();
      scalar_t* var_ = var.data_ptr<scalar_t>();
      if (prior) {
        const Tensor mh = mu_hat.contiguous(), vh = var_hat.contiguous();
        const scalar_t* mh_ = mh.data_ptr<scalar_t>();
        const scalar_t* vh_ = vh.data_ptr<scalar_t>();
        // guard (reference.trusted): NaN (0 / 0) compares false, not trusted
        const double p = p_tensor.defined() ? p_tensor.item<double>() : p_value;
        const int64_t span = guard_per_group ? d.c : gc_n;  // values behind one decision
        for (int64_t lo = 0; lo < gc_n; lo += span) {
          double ratio = 0;
          for (int64_t i = lo; i < lo + span; ++i) ratio += double(vh_[i]) / double(s_[i]);
          const double decided = ratio / double(span) < guard ? p : 0.0;
          std::fill(pe.begin() + lo / d.c, pe.begin() + (lo + span) / d.c, decided);
        }
        for (int64_t i = 0; i < gc_n; ++i) {
          const double pg = pe[i / d.c], dm = double(m_[i]) - double(mh_[i]);
          mu_[i] = scalar_t(double(m_[i]) - pg * dm);
          var_[i] = scalar_t(double(s_[i]) + pg * (double(vh_[i]) - double(s_[i])) +
                             pg * (1.0 - pg) * dm * dm);
        }
      } else {
        std::copy(m_, m_ + gc_n, mu_);
        std::copy(s_, s_ + gc_n, var_);
      }
      const Tensor wc = weight.contiguous(), bc = bias.contiguous();
      const scalar_t* w_ = wc.data_ptr<scalar_t>();
      const scalar_t* b_ = bc.data_ptr<scalar_t>();
      std::vector<double> scale(gc_n), shift(gc_n);
      for (int64_t i = 0; i < gc_n; ++i) {
        const int64_t c = i % d.c;
        scale[i] = double(w_[c]) / std::sqrt(double(var_[i]) + eps);
        shift[i] = double(b_[c]) - double(mu_[i]) * scale[i];
      }
      // y = scale x + shift (no first operand: its coefficients are unused)
      combine<scalar_t>(nullptr, xc.data_ptr<scalar_t>(), d, scale, scale, shift,
                        y.data_ptr<scalar_t>());
    });
    ctx->save_for_backward({xc, mu_hat, var_hat, p_tensor, weight, m, s, mu, var});
    ctx->saved_data["pe"] = pe;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["eps"] = eps;
    ctx->set_materialize_grads(false);  // unused outputs' gradients stay undefined
    return {y, m, s, mu, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &xc = saved[0], &mu_hat = saved[1], &var_hat = saved[2], &p_tensor = saved[3],
                 &weight = saved[4], &m = saved[5], &s = saved[6], &mu = saved[7],
                 &var = saved[8];
    const std::vector<double> pe = ctx->saved_data["pe"].toDoubleVector();
    const double eps = ctx->saved_data["eps"].toDouble();
    const Dims d = dims_of(xc, ctx->saved_data["groups"].toInt());
    const bool prior = mu_hat.defined();
    const int64_t gc_n = d.g * d.c;
    // needs_input_grad counts only the tensors given: x, [mu_hat, var_hat], [p], weight, bias
    const bool given[] = {true, prior, prior, p_tensor.defined(), true, true};
    const auto needs = [&](int k) {
      int edge = 0;
      for (int j = 0; j < k; ++j) edge += given[j];
      return given[k] && ctx->needs_input_grad(edge);
    };
    const auto grad = [&](int i) {  // an output's gradient, contiguous, or undefined
      return grads[i].defined() ? grads[i].contiguous() : Tensor();
    };
    const Tensor g_y = grad(0), g_m = grad(1), g_s = grad(2), g_mu = grad(3), g_var = grad(4);
    Tensor g_x, g_mu_hat, g_var_hat, g_p, g_weight, g_bias;
    AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "bknbench_group_normalize_backward", [&] {
      using T = scalar_t;
      const T* x_ = xc.data_ptr<T>();
      const T* gy_ = g_y.defined() ? g_y.data_ptr<T>() : nullptr;
      const T* mu_ = mu.data_ptr<T>();
      // per (g, c): S1 = sum g_y, S2 = sum g_y (x - mu), over the group's samples in order
      std::vector<double> s1(gc_n, 0.0), s2(gc_n, 0.0);
      if (gy_) {
        double *s1_ = s1.data(), *s2_ = s2.data();
        for_each_range(gc_n, 2 * d.b * d.p, [=](int64_t lo, int64_t hi) {
          channel_blocks(d, lo, hi, [=](int64_t g, int64_t c0, int64_t c1) {
            for (int64_t n = g * d.b; n < (g + 1) * d.b; ++n) {
              for (int64_t c = c0; c < c1; ++c) {
                const int64_t gc = g * d.c + c, off = (n * d.c + c) * d.p;
                const T* gr = gy_ + off;
                const T* xr = x_ + off;
                const T mt = mu_[gc];
                s1_[gc] += row_sum<T>(d.p, [gr](int64_t i) { return gr[i]; });
                s2_[gc] += row_sum<T>(d.p,
                                      [gr, xr, mt](int64_t i) { return gr[i] * (xr[i] - mt); });
              }
            }
          });
        });
      }
      const Tensor wc = weight.contiguous();
      const T* w_ = wc.data_ptr<T>();
      const T *m_ = m.data_ptr<T>(), *s_ = s.data_ptr<T>(), *var_ = var.data_ptr<T>();
      const Tensor mh = prior ? mu_hat.contiguous() : Tensor();
      const Tensor vh = prior ? var_hat.contiguous() : Tensor();
      const T* mh_ = prior ? mh.data_ptr<T>() : nullptr;
      const T* vh_ = prior ? vh.data_ptr<T>() : nullptr;
      const T *gm_ = ptr<T>(g_m), *gs_ = ptr<T>(g_s), *gmu_ = ptr<T>(g_mu),
              *gvar_ = ptr<T>(g_var);
      std::vector<double> gw(d.c, 0.0), gb(d.c, 0.0), a(gc_n), b(gc_n), k(gc_n);
      std::vector<double> gmh(prior ? gc_n : 0), gvh(prior ? gc_n : 0);
      double gp = 0.0;
      for (int64_t i = 0; i < gc_n; ++i) {
        const int64_t c = i % d.c;
        const double pg = pe[i / d.c], q = 1.0 - pg;
        // y = w (x - mu) r + b, r = (var + eps)^-1/2
        const double r = 1.0 / std::sqrt(double(var_[i]) + eps), w = double(w_[c]);
        gw[c] += s2[i] * r;
        gb[c] += s1[i];
        const double g_mu_t = -w * r * s1[i] + value_at(gmu_, i);
        const double g_var_t = -0.5 * w * r * r * r * s2[i] + value_at(gvar_, i);
        double g_m_t = g_mu_t, g_s_t = g_var_t;
        if (prior) {
          // mu = m - pe dm;  var = s + pe (var_hat - s) + pe q dm^2;  dm = m - mu_hat
          const double dm = double(m_[i]) - double(mh_[i]);
          const double g_d = 2.0 * pg * q * dm * g_var_t;
          g_m_t = q * g_mu_t + g_d;
          g_s_t = q * g_var_t;
          gmh[i] = pg * g_mu_t - g_d;
          gvh[i] = pg * g_var_t;
          if (pg != 0.0)  // where the guard rejected, p was unused
            gp += (double(vh_[i]) - double(s_[i]) + (1.0 - 2.0 * pg) * dm * dm) * g_var_t -
                  dm * g_mu_t;
        }
        g_m_t += value_at(gm_, i);
        g_s_t += value_at(gs_, i);
        // through m and s: dm/dx = 1 / n, ds/dx = 2 (x - m) / n
        a[i] = w * r;
        b[i] = 2.0 * g_s_t / d.count();
        k[i] = g_m_t / d.count() - b[i] * double(m_[i]);
      }
      const auto opts = xc.options();
      if (needs(0)) {
        g_x = at::empty(xc.sizes(), opts);
        combine<T>(gy_, x_, d, a, b, k, g_x.data_ptr<T>());
      }
      const auto to_tensor = [&](const std::vector<double>& v, at::IntArrayRef shape) {
        Tensor t = at::empty(shape, opts);
        T* t_ = t.data_ptr<T>();
        for (size_t i = 0; i < v.size(); ++i) t_[i] = T(v[i]);
        return t;
      };
      if (needs(4)) g_weight = to_tensor(gw, {d.c});
      if (needs(5)) g_bias = to_tensor(gb, {d.c});
      if (needs(1)) g_mu_hat = to_tensor(gmh, {d.g, d.c});
      if (needs(2)) g_var_hat = to_tensor(gvh, {d.g, d.c});
      if (prior && needs(3)) g_p = at::full({}, gp, p_tensor.options());
    });
    return {g_x, g_mu_hat, g_var_hat, g_p, Tensor(), g_weight, g_bias,
            Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// ------------------------------------------------------------------ relu_affine
// ReLU of z ~ N(mean, var) per (g, i), then a linear or convolution layer with weight
// (C_out, C_in, *kernel) or (C_out, C_in * P), optional bias: per (g, o)
//   out_mean = sum_i (W summed over kernel positions)[o, i] E[ReLU z_i] + bias[o]
//   out_var  = sum_i (W^2 summed)[o, i] Var[ReLU z_i]
struct ReluTerms {
  double sd, cdf, pdf, m1, v1_raw;
};
constexpr int64_t kTermsCost = 64;  // relu_terms (erfc, exp, sqrt) in values of a pass, about

C10_ALWAYS_INLINE ReluTerms relu_terms(double mean, double var) {  // as before the split
  const double sd = std::sqrt(std::max(var, kVarFloor)), a = mean / sd;
  const double cdf = 0.5 * std::erfc(-a * M_SQRT1_2);
  const double pdf = std::exp(-0.5 * a * a) * (0.5 * M_2_SQRTPI * M_SQRT1_2);
  const double m1 = mean * cdf + sd * pdf;
  return {sd, cdf, pdf, m1, var * cdf + mean * m1 - m1 * m1};
}

// Per (o, i) of a weight (C_out, C_in, kk): W summed over the kk kernel positions, and W^2.
template <typename T>
void kernel_sums(const T* w, int64_t pairs, int64_t kk, std::vector<double>& ws,
                 std::vector<double>& w2s) {
  ws.resize(pairs);
  w2s.resize(pairs);
  double *ws_ = ws.data(), *w2s_ = w2s.data();
  for_each_unit(pairs, 2 * kk, [=](int64_t j) {
    double sum = 0.0, sq = 0.0;
    for (int64_t q = 0; q < kk; ++q) {
      const double v = double(w[j * kk + q]);
      sum += v;
      sq += v * v;
    }
    ws_[j] = sum;
    w2s_[j] = sq;
  });
}

struct ReluAffine : public torch::autograd::Function<ReluAffine> {
  static variable_list forward(AutogradContext* ctx, Tensor mean, Tensor var, Tensor weight,
                               std::optional<Tensor> bias_opt) {
    const Tensor bias = bias_opt.value_or(Tensor());
    const Tensor mc = mean.contiguous(), vc = var.contiguous(), wc = weight.contiguous();
    const int64_t g = mc.size(0), ci = mc.size(1), co = wc.size(0);
    const int64_t kk = ci * co ? wc.numel() / (ci * co) : 0;
    TORCH_CHECK(wc.numel() == co * ci * kk, "relu_affine: weight ", wc.sizes(),
                " does not split into ", ci, " input channels");
    Tensor out_mean = at::empty({g, co}, mc.options()), out_var = at::empty({g, co}, mc.options());
    AT_DISPATCH_FLOATING_TYPES(mc.scalar_type(), "bknbench_relu_affine", [&] {
      using T = scalar_t;
      const T *m_ = mc.data_ptr<T>(), *v_ = vc.data_ptr<T>(), *w_ = wc.data_ptr<T>();
      std::vector<double> m1_v(g * ci), v1_v(g * ci), ws_v, w2s_v;
      double *m1 = m1_v.data(), *v1 = v1_v.data();
      for_each_unit(g * ci, kTermsCost, [=](int64_t i) {
        const ReluTerms t = relu_terms(double(m_[i]), double(v_[i]));
        m1[i] = t.m1;
        v1[i] = std::max(t.v1_raw, 0.0);
      });
      kernel_sums(w_, co * ci, kk, ws_v, w2s_v);
      const double *ws = ws_v.data(), *w2s = w2s_v.data();
      const Tensor bc = bias.defined() ? bias.contiguous() : Tensor();
      const T* b_ = bc.defined() ? bc.data_ptr<T>() : nullptr;
      T *om = out_mean.data_ptr<T>(), *ov = out_var.data_ptr<T>();
      for_each_range(g * co, 2 * ci, [=](int64_t lo, int64_t hi) {  // gg * C_out + o
        for (int64_t go = lo, gg = lo / co, o = lo % co; go < hi; ++go) {
          double sm = value_at(b_, o), sv = 0.0;
          for (int64_t i = 0; i < ci; ++i) {
            sm += ws[o * ci + i] * m1[gg * ci + i];
            sv += w2s[o * ci + i] * v1[gg * ci + i];
          }
          om[go] = T(sm);
          ov[go] = T(sv);
          if (++o == co) {
            o = 0;
            ++gg;
          }
        }
      });
    });
    ctx->save_for_backward({mc, vc, wc});
    ctx->saved_data["has_bias"] = bias.defined();
    ctx->set_materialize_grads(false);
    return {out_mean, out_var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &mc = saved[0], &vc = saved[1], &wc = saved[2];
    const int64_t g = mc.size(0), ci = mc.size(1), co = wc.size(0);
    const int64_t kk = ci * co ? wc.numel() / (ci * co) : 0;
    const Tensor g_out_m = grads[0].defined() ? grads[0].contiguous() : Tensor();
    const Tensor g_out_v = grads[1].defined() ? grads[1].contiguous() : Tensor();
    Tensor g_mean, g_var, g_w, g_bias;
    AT_DISPATCH_FLOATING_TYPES(mc.scalar_type(), "bknbench_relu_affine_backward", [&] {
      using T = scalar_t;
      const T *m_ = mc.data_ptr<T>(), *v_ = vc.data_ptr<T>(), *w_ = wc.data_ptr<T>();
      const T *gom_ = ptr<T>(g_out_m), *gov_ = ptr<T>(g_out_v);
      std::vector<ReluTerms> terms_v(g * ci);
      ReluTerms* terms = terms_v.data();
      for_each_unit(g * ci, kTermsCost,
                    [=](int64_t i) { terms[i] = relu_terms(double(m_[i]), double(v_[i])); });
      std::vector<double> ws_v, w2s_v;
      kernel_sums(w_, co * ci, kk, ws_v, w2s_v);
      const double *ws = ws_v.data(), *w2s = w2s_v.data();
      // weight: d/dW of sum_k W_k (mean side) and of sum_k W_k^2 (variance side)
      std::vector<double> gws_v(co * ci, 0.0), gw2s_v(co * ci, 0.0);
      double *gws = gws_v.data(), *gw2s = gw2s_v.data();
      Tensor gm = at::empty({g, ci}, mc.options()), gv = at::empty({g, ci}, mc.options());
      T *gmean_ = gm.data_ptr<T>(), *gvar_ = gv.data_ptr<T>();
      // per input channel i, the groups in order: the weight's sums over groups stay in i's unit
      for_each_unit(ci, 4 * g * co, [=](int64_t i) {
        for (int64_t gg = 0; gg < g; ++gg) {
          const ReluTerms& t = terms[gg * ci + i];
          const double v1 = std::max(t.v1_raw, 0.0);
          double g_m1 = 0.0, g_v1 = 0.0;
          for (int64_t o = 0; o < co; ++o) {
            const double go_m = value_at(gom_, gg * co + o), go_v = value_at(gov_, gg * co + o);
            g_m1 += go_m * ws[o * ci + i];
            g_v1 += go_v * w2s[o * ci + i];
            gws[o * ci + i] += go_m * t.m1;
            gw2s[o * ci + i] += go_v * v1;
          }
          if (t.v1_raw < 0) g_v1 = 0.0;  // the clamp at 0 passes the gradient at >= 0
          // v1 = E[y^2] - m1^2; the phi terms reach var only above the floor
          const double half_pdf_sd = double(v_[gg * ci + i]) > kVarFloor ? t.pdf / t.sd : 0.0;
          gmean_[gg * ci + i] = T(g_m1 * t.cdf + 2.0 * g_v1 * t.m1 * (1.0 - t.cdf));
          gvar_[gg * ci + i] = T(g_v1 * t.cdf + 0.5 * (g_m1 - 2.0 * g_v1 * t.m1) * half_pdf_sd);
        }
      });
      g_mean = gm;
      g_var = gv;
      if (ctx->needs_input_grad(2)) {
        g_w = at::empty(wc.sizes(), wc.options());
        T* gw_ = g_w.data_ptr<T>();
        for_each_unit(co * ci, kk, [=](int64_t j) {
          for (int64_t q = 0; q < kk; ++q) {
            gw_[j * kk + q] = T(gws[j] + 2.0 * double(w_[j * kk + q]) * gw2s[j]);
          }
        });
      }
      if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3)) {
        g_bias = at::empty({co}, mc.options());
        T* gb_ = g_bias.data_ptr<T>();
        for (int64_t o = 0; o < co; ++o) {
          double sum = 0.0;
          for (int64_t gg = 0; gg < g; ++gg) sum += value_at(gom_, gg * co + o);
          gb_[o] = T(sum);
        }
      }
    });
    return {g_mean, g_var, g_w, g_bias};
  }
};

// How many of torch's threads for_each_unit puts to work on `units` units of `cost` values
// each (tests: the split, and the grain below which a call runs inline).
int64_t threads_for(int64_t units, int64_t cost) {
  std::vector<char> seen(std::max<int>(1, at::get_num_threads()), 0);
  for_each_unit(units, cost, [&](int64_t) { seen[at::get_thread_num()] = 1; });
  return std::count(seen.begin(), seen.end(), 1);
}

variable_list group_normalize(Tensor x, std::optional<Tensor> mu_hat,
                              std::optional<Tensor> var_hat, std::optional<Tensor> p_tensor,
                              double p_value, Tensor weight, Tensor bias, int64_t groups,
                              double guard, double eps, bool guard_per_group) {
  return GroupNormalize::apply(x, mu_hat, var_hat, p_tensor, p_value, weight, bias, groups,
                               guard, eps, guard_per_group);
}

variable_list relu_affine(Tensor mean, Tensor var, Tensor weight, std::optional<Tensor> bias) {
  return ReluAffine::apply(mean, var, weight, bias);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("group_normalize", &group_normalize, "fused.GroupNormalize on CPU");
  m.def("relu_affine", &relu_affine, "fused._ReluAffine on CPU");
  m.def("threads_for", &threads_for, "threads the kernels' split uses (a diagnostic)");
}
