// CPU kernels for the hand-written autograd nodes of bknbench/kernels/fused.py and borders.py:
//   group_normalize: per-group moments -> optional Kalman fusion with a prediction -> normalize
//   relu_affine:     moments after ReLU then a linear or convolution layer
//   relu_conv:       the same with the convolution's zero padding counted (border patterns)
// Same inputs, outputs and gradients as the Python nodes `fused.GroupNormalize`,
// `relu._ReluAffine` and `borders._ReluConv`; tests check them against the reference
// formulas.
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
#include <type_traits>
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
// through references to vectors gcc reloads and stores every step (W's sums ran 3x slower).
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
void channel_blocks(int64_t c, int64_t lo, int64_t hi, const F& f) {
  for (int64_t g = lo / c; g * c < hi; ++g) {
    f(g, std::max(lo - g * c, int64_t(0)), std::min(hi - g * c, c));
  }
}

// Per (g, c): observed mean m and biased variance s, two passes as torch's batch norm.
template <typename T>
void observe(const T* x, const Dims& d, T* m, T* s) {
  std::vector<double> acc_v(d.g * d.c, 0.0);  // per (g, c) sums, in double
  double* acc = acc_v.data();
  for_each_range(d.g * d.c, 2 * d.b * d.p, [=](int64_t lo, int64_t hi) {
    channel_blocks(d.c, lo, hi, [=](int64_t g, int64_t c0, int64_t c1) {
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

// The running statistics of a training forward (reference.update_running), in place as
// torch's batch norm updates its buffers: per channel the EMA over the groups in order, in
// closed form (group g weighted momentum (1 - momentum)^(G-1-g)), of the mean used and of
// the variance the rule takes in: with a prediction reference.running_variance (rule 0
// "observed", 1 "posterior", 2 "authors": the order of reference.RUNNING_RULES) with the
// weight pe the guard gave it, without one BatchNorm's s n / (n - 1). Here, not in Python:
// the guard's decision is at hand, and a layer's update is one call, not about 15 small ops.
template <typename T>
void update_running(const Dims& d, const T* mu, const T* var, const T* s,
                    const std::vector<double>& pe, bool prior, int64_t rule, double momentum,
                    const Tensor& running_mean, const Tensor& running_var) {
  TORCH_CHECK(running_mean.is_contiguous() && running_var.is_contiguous() &&
                  running_mean.numel() == d.c && running_var.numel() == d.c,
              "group_normalize: running buffers of ", d.c, " channels");
  TORCH_CHECK(rule >= 0 && rule <= 2, "group_normalize: running rule ", rule);
  const double n = d.count(), decay = 1.0 - momentum, keep = std::pow(decay, double(d.g));
  std::vector<double> w(d.g);
  for (int64_t g = 0; g < d.g; ++g) w[g] = momentum * std::pow(decay, double(d.g - 1 - g));
  T *rm = running_mean.data_ptr<T>(), *rv = running_var.data_ptr<T>();
  for (int64_t c = 0; c < d.c; ++c) {
    double sm = 0.0, sv = 0.0;
    for (int64_t g = 0; g < d.g; ++g) {
      const int64_t i = g * d.c + c;
      double target = double(var[i]);  // without a prediction var = s
      if (prior && rule == 0) {
        target += double(s[i]) * ((1.0 - pe[g]) * (1.0 - pe[g])) * (1.0 / (n - 1.0));
      } else if (prior && rule == 1) {
        target *= n / (n - 1.0);
      }
      sm += w[g] * double(mu[i]);
      sv += w[g] * target;
    }
    rm[c] = T(keep * double(rm[c]) + sm);
    rv[c] = T(keep * double(rv[c]) + (prior ? 1.0 : n / (n - 1.0)) * sv);
  }
}

// ------------------------------------------------------------------ group_normalize
// Inputs: x (N, C, *S); mu_hat, var_hat (G, C) or undefined (no prediction: per-group BN);
// p_tensor (0-d, a learnable gain) or undefined, then p_value is the weight on the
// prediction; weight, bias (C,); guard_per_group: one guard decision per group from its
// own channel average instead of one over all groups (reference.trusted); running_mean,
// running_var (C,) or undefined, updated in place with `momentum` and `rule`
// (update_running).
// Outputs: y (N, C, *S); m, s (observed); mu, var (used).
struct GroupNormalize : public torch::autograd::Function<GroupNormalize> {
  static variable_list forward(AutogradContext* ctx, Tensor x, std::optional<Tensor> mu_hat_opt,
                               std::optional<Tensor> var_hat_opt,
                               std::optional<Tensor> p_opt, double p_value, Tensor weight,
                               Tensor bias, int64_t groups, double guard, double eps,
                               bool guard_per_group, std::optional<Tensor> running_mean,
                               std::optional<Tensor> running_var, double momentum,
                               int64_t rule) {
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
      if (running_mean && running_var) {
        update_running(d, mu_, var_, s_, pe, prior, rule, momentum, *running_mean,
                       *running_var);
      }
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
          channel_blocks(d.c, lo, hi, [=](int64_t g, int64_t c0, int64_t c1) {
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
    return {g_x,      g_mu_hat, g_var_hat, g_p,      Tensor(), g_weight, g_bias, Tensor(),
            Tensor(), Tensor(), Tensor(),  Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// ------------------------------------------------------------------ relu_affine, relu_conv
// ReLU of z ~ N(mean, var) per (g, i), then a linear or convolution layer: weight
// (C_out, C_in, *kernel) or (C_out, C_in * P), K values per (o, i), optional bias.
// relu_conv counts zero padding (kernels/borders.py `_ReluConv`): the output positions fall
// into R patterns of the taps that read inside the input, a 0/1 tap mask (R, K), pattern r
// holding a share s_r of the positions (R,). Per (g, o) and pattern r
//   taps[i, o, r] = sum_k mask[r, k] W[o, i, k]          taps2: the same with W^2
//   mp_r = sum_i taps[i, o, r] E[ReLU z_i] + bias[o]      vp_r = sum_i taps2[i, o, r] Var[ReLU z_i]
// and over all positions the mixture of the patterns (reference.positions_mixture):
//   out_mean = sum_r s_r mp_r,   out_var = sum_r s_r (vp_r + (mp_r - out_mean)^2).
// relu_affine is the case R = 1, every tap read, s = 1 (a linear layer, or borders ignored):
// W summed over the kernel; there mp - out_mean is exactly 0 and the mixture changes no bit.
// Layout: taps (C_in, C_out, R), so that the long loops, over (o, r), read and write in
// order and vectorize, while every output still sums its input channels in order: forward,
// per group, each input channel is added into every (o, r); backward, per input channel,
// its row of the taps is read and its row of their gradient accumulated group by group.
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

// y[j] += a[j] s for j < n: one term more in n sums; `first`: y[j] = 0.0 + a[j] s, the sums'
// first term (the bits of adding into 0.0, without zeroing y first).
C10_ALWAYS_INLINE void axpy(int64_t n, double s, const double* a, double* y,
                            bool first = false) {
  if (first) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] = 0.0 + a[j] * s;
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] += a[j] * s;
}

// The sizes of a call and its patterns: which taps each pattern reads and which patterns
// read each tap, as lists (the mask has many zeros at small maps: a 3x3 kernel on a 2x2 map
// reads 4 of its 9 taps at every position; the loops skip them, 2x faster than a product
// with the mask), and the shares. Without a mask (relu_affine): one pattern of every tap,
// share 1, no lists.
struct Patterns {
  int64_t g, ci, co, k, r;  // groups, input and output channels, taps per (o, i), patterns
  bool masked;
  // taps of pattern r: reads[reads_at[r] .. reads_at[r + 1]); patterns reading tap q:
  // readers[readers_at[q] .. readers_at[q + 1]); both in increasing order
  std::vector<int64_t> reads, reads_at, readers, readers_at;
  std::vector<double> share_v;
  const double* share() const { return share_v.empty() ? nullptr : share_v.data(); }
};

double or_one(const double* p, int64_t i) { return p ? p[i] : 1.0; }

// A tensor's values in double, in order, without a tensor op for float32 and float64 (the
// exact conversion .to(kDouble) makes; at G = 1 two such ops per call cost more than the loops).
std::vector<double> as_doubles(const Tensor& t) {
  const Tensor c = t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble
                       ? t.contiguous()
                       : t.to(at::kDouble).contiguous();
  std::vector<double> out(c.numel());
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "bknbench_as_doubles", [&] {
    const scalar_t* v = c.data_ptr<scalar_t>();
    for (size_t j = 0; j < out.size(); ++j) out[j] = double(v[j]);
  });
  return out;
}

Patterns patterns_of(const Tensor& mean, const Tensor& weight, const Tensor& mask,
                     const Tensor& share) {
  const int64_t g = mean.size(0), ci = mean.size(1), co = weight.size(0);
  const int64_t k = ci * co ? weight.numel() / (ci * co) : 0;
  TORCH_CHECK(weight.numel() == co * ci * k, "relu_affine: weight ", weight.sizes(),
              " does not split into ", ci, " input channels");
  Patterns p{g, ci, co, k, 1, mask.defined(), {}, {}, {}, {}, {}};
  if (!p.masked) return p;
  TORCH_CHECK(mask.dim() == 2 && mask.size(1) == k && share.defined() &&
                  share.numel() == mask.size(0),
              "relu_conv: a tap mask (R, ", k, ") and shares (R,), got ", mask.sizes(), " and ",
              share.defined() ? share.sizes() : at::IntArrayRef{});
  p.r = mask.size(0);
  const std::vector<double> m_v = as_doubles(mask);
  const double* m = m_v.data();
  for (int64_t r = 0; r < p.r; ++r) {
    p.reads_at.push_back(p.reads.size());
    for (int64_t q = 0; q < k; ++q) {
      TORCH_CHECK(m[r * k + q] == 0.0 || m[r * k + q] == 1.0, "relu_conv: a 0/1 tap mask");
      if (m[r * k + q] != 0.0) p.reads.push_back(q);
    }
  }
  p.reads_at.push_back(p.reads.size());
  for (int64_t q = 0; q < k; ++q) {
    p.readers_at.push_back(p.readers.size());
    for (int64_t r = 0; r < p.r; ++r) {
      if (m[r * k + q] != 0.0) p.readers.push_back(r);
    }
  }
  p.readers_at.push_back(p.readers.size());
  p.share_v = as_doubles(share);
  return p;
}

// The loops over the weight run per input channel i (the unit of the split), over the
// output channels o kTile at a time, their sums side by side in registers: each tap sum of
// (i, o) is its own chain in a fixed order (the taps in order, from 0). At G = 1 these short
// sums are the kernel's cost; one pair at a time they were bound by the latency of one
// addition waiting for the last, and a whole row at a time by loads and stores of the sums.
// `weight_rows` gives the rows: the weight of input channel i as (K, C_out) in double.
constexpr int64_t kTile = 8;

template <typename T>
void weight_rows(const T* w, int64_t ci, int64_t co, int64_t k, int64_t i, double* rows) {
  for (int64_t o = 0; o < co; ++o) {
    const T* wo = w + (o * ci + i) * k;
    for (int64_t q = 0; q < k; ++q) rows[q * co + o] = double(wo[q]);
  }
}

// f(tile, o0) for the output channels [o0, o0 + tile), tile a std::integral_constant: kTile
// or, for the last few, 1.
template <typename F>
C10_ALWAYS_INLINE void for_each_tile(int64_t co, const F& f) {
  int64_t o0 = 0;
  for (; o0 + kTile <= co; o0 += kTile) f(std::integral_constant<int64_t, kTile>{}, o0);
  for (; o0 < co; ++o0) f(std::integral_constant<int64_t, 1>{}, o0);
}

// taps and taps2 (C_in, C_out, R) of a weight (C_out, C_in, K).
template <typename T>
void pattern_sums(const T* w, const Patterns& p, double* taps, double* taps2) {
  const bool masked = p.masked;
  const int64_t ci = p.ci, co = p.co, k = p.k, r_n = p.r;
  const int64_t *reads = p.reads.data(), *reads_at = p.reads_at.data();
  for_each_range(ci, 2 * k * r_n * co, [=](int64_t lo, int64_t hi) {
    std::vector<double> rows_v(k * co);
    double* rows = rows_v.data();
    for (int64_t i = lo; i < hi; ++i) {
      weight_rows(w, ci, co, k, i, rows);
      for (int64_t r = 0; r < r_n; ++r) {
        // every tap without a mask (a linear layer: K = 1)
        const int64_t t0 = masked ? reads_at[r] : 0, t1 = masked ? reads_at[r + 1] : k;
        double *out = taps + i * co * r_n + r, *out2 = taps2 + i * co * r_n + r;
        for_each_tile(co, [&](auto tile, int64_t o0) {
          constexpr int64_t L = decltype(tile)::value;
          double sum[L] = {}, sq[L] = {};
          for (int64_t t = t0; t < t1; ++t) {
            const double* v = rows + (masked ? reads[t] : t) * co + o0;
#pragma omp simd
            for (int64_t b = 0; b < L; ++b) {
              sum[b] += v[b];
              sq[b] += v[b] * v[b];
            }
          }
          for (int64_t b = 0; b < L; ++b) {
            out[(o0 + b) * r_n] = sum[b];
            out2[(o0 + b) * r_n] = sq[b];
          }
        });
      }
    }
  });
}

constexpr int64_t kLanes = 4;  // input channels side by side in the backward's dot products

// n doubles of the calling thread's scratch memory, kept from call to call and valid until
// its next call: the backward's buffers of the taps' gradients are large at G = 1 (C_in C_out
// R each) and a fresh allocation per call cost page faults and heap trimming. One user at a
// time per thread: the backward of ReluConv, which calls no other kernel while it holds it.
double* scratch(size_t n) {
  thread_local std::vector<double> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// Inputs: mean, var (G, C_in); weight; bias (C_out,) or undefined; mask (R, K) and share
// (R,), or both undefined (relu_affine). Outputs: out_mean, out_var (G, C_out).
struct ReluConv : public torch::autograd::Function<ReluConv> {
  static variable_list forward(AutogradContext* ctx, Tensor mean, Tensor var, Tensor weight,
                               std::optional<Tensor> bias_opt, std::optional<Tensor> mask_opt,
                               std::optional<Tensor> share_opt) {
    const Tensor bias = bias_opt.value_or(Tensor()), mask = mask_opt.value_or(Tensor());
    const Tensor share = share_opt.value_or(Tensor());
    const Tensor mc = mean.contiguous(), vc = var.contiguous(), wc = weight.contiguous();
    const Patterns p = patterns_of(mc, wc, mask, share);
    const auto opts = mc.options();
    Tensor out_mean = at::empty({p.g, p.co}, opts), out_var = at::empty({p.g, p.co}, opts);
    // kept for the backward, in double: taps and taps2, and mp_r - out_mean per (g, o, r)
    const int64_t n_taps = p.ci * p.co * p.r;
    Tensor taps = at::empty({2 * n_taps}, opts.dtype(at::kDouble));
    Tensor dev = at::empty({p.g * p.co * p.r}, opts.dtype(at::kDouble));
    AT_DISPATCH_FLOATING_TYPES(mc.scalar_type(), "bknbench_relu_conv", [&] {
      using T = scalar_t;
      const T *m_ = mc.data_ptr<T>(), *v_ = vc.data_ptr<T>(), *w_ = wc.data_ptr<T>();
      const int64_t ci = p.ci, co = p.co, r_n = p.r;
      std::vector<double> m1_v(p.g * ci), v1_v(p.g * ci), vp_v(p.g * co * r_n);
      double *m1 = m1_v.data(), *v1 = v1_v.data(), *vp = vp_v.data();
      for_each_unit(p.g * ci, kTermsCost, [=](int64_t i) {
        const ReluTerms t = relu_terms(double(m_[i]), double(v_[i]));
        m1[i] = t.m1;
        v1[i] = std::max(t.v1_raw, 0.0);
      });
      double *tp = taps.data_ptr<double>(), *tp2 = tp + n_taps;
      pattern_sums(w_, p, tp, tp2);
      const Tensor bc = bias.defined() ? bias.contiguous() : Tensor();
      const T* b_ = ptr<T>(bc);
      const double* share_ = p.share();
      T *om = out_mean.data_ptr<T>(), *ov = out_var.data_ptr<T>();
      double* mp = dev.data_ptr<double>();  // mp_r, then mp_r - out_mean, per (g, o, r)
      for_each_range(p.g * co, 2 * ci * r_n, [=](int64_t lo, int64_t hi) {  // gg * C_out + o
        channel_blocks(co, lo, hi, [=](int64_t gg, int64_t o0, int64_t o1) {
          const int64_t first = (gg * co + o0) * r_n, n = (o1 - o0) * r_n;
          for (int64_t o = o0; o < o1; ++o) {
            std::fill(mp + (gg * co + o) * r_n, mp + (gg * co + o + 1) * r_n, value_at(b_, o));
          }
          std::fill(vp + first, vp + first + n, 0.0);
          for (int64_t i = 0; i < ci; ++i) {
            const int64_t row = (i * co + o0) * r_n;
            axpy(n, m1[gg * ci + i], tp + row, mp + first);
            axpy(n, v1[gg * ci + i], tp2 + row, vp + first);
          }
          for (int64_t go = gg * co + o0; go < gg * co + o1; ++go) {
            double *mpo = mp + go * r_n, *vpo = vp + go * r_n;
            double sm = 0.0, sv = 0.0;
            for (int64_t r = 0; r < r_n; ++r) {
              sm += or_one(share_, r) * mpo[r];
              sv += or_one(share_, r) * vpo[r];
            }
            for (int64_t r = 0; r < r_n; ++r) {
              mpo[r] -= sm;
              sv += or_one(share_, r) * mpo[r] * mpo[r];
            }
            om[go] = T(sm);
            ov[go] = T(sv);
          }
        });
      });
    });
    ctx->save_for_backward({mc, vc, wc, mask, share, taps, dev});
    ctx->saved_data["has_bias"] = bias.defined();
    ctx->set_materialize_grads(false);
    return {out_mean, out_var};
  }

  // Through the mixture: d/d mp_r = s_r (g_mean + 2 g_var (mp_r - out_mean)) and d/d vp_r =
  // s_r g_var; through the pattern sums into the ReLU's moments and the taps; through
  // taps = W mask^T and taps2 = W^2 mask^T into W; through the ReLU as fused.py's
  // `relu_moments_backward`.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &mc = saved[0], &vc = saved[1], &wc = saved[2], &taps = saved[5],
                 &dev = saved[6];
    const Patterns p = patterns_of(mc, wc, saved[3], saved[4]);
    const Tensor g_out_m = grads[0].defined() ? grads[0].contiguous() : Tensor();
    const Tensor g_out_v = grads[1].defined() ? grads[1].contiguous() : Tensor();
    Tensor g_mean, g_var, g_w, g_bias;
    AT_DISPATCH_FLOATING_TYPES(mc.scalar_type(), "bknbench_relu_conv_backward", [&] {
      using T = scalar_t;
      const T *m_ = mc.data_ptr<T>(), *v_ = vc.data_ptr<T>(), *w_ = wc.data_ptr<T>();
      const T *gom_ = ptr<T>(g_out_m), *gov_ = ptr<T>(g_out_v);
      const int64_t g = p.g, ci = p.ci, co = p.co, k = p.k, r_n = p.r, row = co * r_n;
      std::vector<ReluTerms> terms_v(g * ci);
      ReluTerms* terms = terms_v.data();
      for_each_unit(g * ci, kTermsCost,
                    [=](int64_t i) { terms[i] = relu_terms(double(m_[i]), double(v_[i])); });
      const double *tp = taps.data_ptr<double>(), *tp2 = tp + ci * row;
      const double *dv = dev.data_ptr<double>(), *share_ = p.share();
      const bool masked = p.masked;
      const int64_t *readers = p.readers.data(), *readers_at = p.readers_at.data();
      // the pattern sums' gradients per (g, o, r)
      std::vector<double> gmp_v(g * row), gvp_v(g * row);
      double *gmp = gmp_v.data(), *gvp = gvp_v.data();
      for_each_unit(g * co, 4 * r_n, [=](int64_t go) {
        const double go_m = value_at(gom_, go), go_v = value_at(gov_, go);
        for (int64_t r = 0; r < r_n; ++r) {
          const double s = or_one(share_, r);
          gmp[go * r_n + r] = s * (go_m + 2.0 * go_v * dv[go * r_n + r]);
          gvp[go * r_n + r] = s * go_v;
        }
      });
      // the same per (g, r, o), for the taps' gradients in the layout (C_in, R, C_out)
      std::vector<double> gmpt_v(g * row), gvpt_v(g * row);
      double *gmpt = gmpt_v.data(), *gvpt = gvpt_v.data();
      for (int64_t gg = 0; gg < g; ++gg) {
        for (int64_t o = 0; o < co; ++o) {
          for (int64_t r = 0; r < r_n; ++r) {
            gmpt[(gg * r_n + r) * co + o] = gmp[(gg * co + o) * r_n + r];
            gvpt[(gg * r_n + r) * co + o] = gvp[(gg * co + o) * r_n + r];
          }
        }
      }
      // the taps' gradients: sums over groups of E[ReLU z] d/d mp (taps2: Var[ReLU z] d/d vp),
      // (C_in, R, C_out), so that the weight's gradient below reads rows of C_out; filled by
      // the first group (`axpy` into 0.0: the same bits), not zeroed first; in the thread's
      // `scratch`
      double* gt = scratch(2 * ci * row);
      double* gt2 = gt + ci * row;
      if (g == 0) {  // no group: no term
        std::fill(gt, gt + ci * row, 0.0);
        std::fill(gt2, gt2 + ci * row, 0.0);
      }
      Tensor gm = at::empty({g, ci}, mc.options()), gv = at::empty({g, ci}, mc.options());
      T *gmean_ = gm.data_ptr<T>(), *gvar_ = gv.data_ptr<T>();
      // per input channel i, the groups in order: the taps' sums over groups stay in i's
      // unit; kLanes channels side by side, each its own chain in its own order (the dot
      // products over (o, r) were bound by one addition waiting for the last)
      const auto channels = [=](auto lanes, int64_t i0) {
        constexpr int64_t L = decltype(lanes)::value;
        for (int64_t gg = 0; gg < g; ++gg) {
          const double *a = gmp + gg * row, *b = gvp + gg * row;
          double g_m1[L], g_v1[L];
          for (int64_t l = 0; l < L; ++l) g_m1[l] = g_v1[l] = 0.0;
          for (int64_t j = 0; j < row; ++j) {  // (o, r)
            for (int64_t l = 0; l < L; ++l) {
              g_m1[l] += a[j] * tp[(i0 + l) * row + j];
              g_v1[l] += b[j] * tp2[(i0 + l) * row + j];
            }
          }
          for (int64_t l = 0; l < L; ++l) {
            const int64_t i = i0 + l;
            const ReluTerms& t = terms[gg * ci + i];
            axpy(row, t.m1, gmpt + gg * row, gt + i * row, gg == 0);
            axpy(row, std::max(t.v1_raw, 0.0), gvpt + gg * row, gt2 + i * row, gg == 0);
            const double gv1 = t.v1_raw < 0 ? 0.0 : g_v1[l];  // the clamp passes it at >= 0
            // v1 = E[y^2] - m1^2; the phi terms reach var only above the floor
            const double half_pdf_sd =
                double(v_[gg * ci + i]) > kVarFloor ? t.pdf / t.sd : 0.0;
            gmean_[gg * ci + i] = T(g_m1[l] * t.cdf + 2.0 * gv1 * t.m1 * (1.0 - t.cdf));
            gvar_[gg * ci + i] =
                T(gv1 * t.cdf + 0.5 * (g_m1[l] - 2.0 * gv1 * t.m1) * half_pdf_sd);
          }
        }
      };
      for_each_range(ci, 4 * g * row, [=](int64_t lo, int64_t hi) {
        int64_t i = lo;
        for (; i + kLanes <= hi; i += kLanes) {
          channels(std::integral_constant<int64_t, kLanes>{}, i);
        }
        for (; i < hi; ++i) channels(std::integral_constant<int64_t, 1>{}, i);
      });
      g_mean = gm;
      g_var = gv;
      if (ctx->needs_input_grad(2)) {  // W[o, i, k] reaches the taps of the patterns reading k
        g_w = at::empty(wc.sizes(), wc.options());
        T* gw_ = g_w.data_ptr<T>();
        // per input channel i (see pattern_sums), per tile of output channels and tap q,
        // the sum over the patterns reading q, into (K, C_out), written to the weight's
        // layout after
        for_each_range(ci, 2 * k * r_n * co, [=](int64_t lo, int64_t hi) {
          std::vector<double> buf(2 * k * co);
          double *rows = buf.data(), *res = rows + k * co;
          for (int64_t i = lo; i < hi; ++i) {
            const double *a = gt + i * row, *a2 = gt2 + i * row;
            weight_rows(w_, ci, co, k, i, rows);
            for_each_tile(co, [&](auto tile, int64_t o0) {
              constexpr int64_t L = decltype(tile)::value;
              for (int64_t q = 0; q < k; ++q) {
                double w2[L], sum[L] = {};
                for (int64_t b = 0; b < L; ++b) w2[b] = 2.0 * rows[q * co + o0 + b];
                if (!masked) {  // one pattern, reading every tap
                  for (int64_t b = 0; b < L; ++b) sum[b] = a[o0 + b] + w2[b] * a2[o0 + b];
                } else {
                  for (int64_t t = readers_at[q]; t < readers_at[q + 1]; ++t) {
                    const double *ar = a + readers[t] * co + o0, *ar2 = a2 + readers[t] * co + o0;
                    _Pragma("omp simd")  // (a #pragma cannot stand in AT_DISPATCH's argument)
                    for (int64_t b = 0; b < L; ++b) sum[b] += ar[b] + w2[b] * ar2[b];
                  }
                }
                for (int64_t b = 0; b < L; ++b) res[q * co + o0 + b] = sum[b];
              }
            });
            for (int64_t o = 0; o < co; ++o) {
              T* gwo = gw_ + (o * ci + i) * k;
              for (int64_t q = 0; q < k; ++q) gwo[q] = T(res[q * co + o]);
            }
          }
        });
      }
      if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3)) {
        g_bias = at::empty({co}, mc.options());
        T* gb_ = g_bias.data_ptr<T>();
        for (int64_t o = 0; o < co; ++o) {
          double sum = 0.0;
          for (int64_t gg = 0; gg < g; ++gg) {
            for (int64_t r = 0; r < r_n; ++r) sum += gmp[(gg * co + o) * r_n + r];
          }
          gb_[o] = T(sum);
        }
      }
    });
    return {g_mean, g_var, g_w, g_bias, Tensor(), Tensor()};
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
                              double guard, double eps, bool guard_per_group,
                              std::optional<Tensor> running_mean,
                              std::optional<Tensor> running_var, double momentum, int64_t rule) {
  return GroupNormalize::apply(x, mu_hat, var_hat, p_tensor, p_value, weight, bias, groups,
                               guard, eps, guard_per_group, running_mean, running_var,
                               momentum, rule);
}

variable_list relu_affine(Tensor mean, Tensor var, Tensor weight, std::optional<Tensor> bias) {
  return ReluConv::apply(mean, var, weight, bias, std::nullopt, std::nullopt);
}

variable_list relu_conv(Tensor mean, Tensor var, Tensor weight, std::optional<Tensor> bias,
                        Tensor mask, Tensor share) {
  return ReluConv::apply(mean, var, weight, bias, mask, share);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("group_normalize", &group_normalize, "fused.GroupNormalize on CPU");
  m.def("relu_affine", &relu_affine, "relu._ReluAffine on CPU");
  m.def("relu_conv", &relu_conv, "borders._ReluConv on CPU");
  m.def("threads_for", &threads_for, "threads the kernels' split uses (a diagnostic)");
}
