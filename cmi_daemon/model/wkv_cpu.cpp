// The RWKV-4 WKV recurrence on the CPU, forward and backward, for training and prefill.
//
// Layout of RWKV-LM's CUDA kernel: k, v, y (B, T, C) contiguous, w = -exp(time_decay) and
// u = time_first (C). Unlike that kernel the state is carried in and out: aa, bb, pp (B, C) hold
// the state before the first token on entry and after the last on return (numerator =
// aa * exp(pp), denominator = bb * exp(pp), as cmi_daemon/model/rwkv.py). Every exp is taken of
// a difference against a running maximum, so nothing overflows for any decay or key.
//
// Work is split into (sequence, block of channels) items over n_threads std::threads; within an
// item the loop over channels is innermost and contiguous, so it vectorises (float: exp below).
// A plain C ABI, called through ctypes: no Python or torch headers, so it builds in a second.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

constexpr int kBlock = 64;             // channels per work item
constexpr double kEmptyLogScale = -1e30;

// exp for float in a form the compiler vectorises (Cephes expf: range reduction by ln 2 and a
// degree-6 polynomial, about 1 ulp); inputs are clamped to [-87, 88], so exp(-huge) is ~1e-38.
inline float exp_of(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline double exp_of(double x) { return std::exp(x); }

template <typename Item>
void run_items(int n_items, int n_threads, const Item &item) {
  n_threads = std::max(1, std::min(n_threads, n_items));
  if (n_threads == 1) {
    for (int i = 0; i < n_items; ++i) item(i);
    return;
  }
  std::vector<std::thread> threads;
  for (int t = 0; t < n_threads; ++t)
    threads.emplace_back([&, t] {
      for (int i = t; i < n_items; i += n_threads) item(i);
    });
  for (auto &thread : threads) thread.join();
}

template <typename F>
void forward(int B, int T, int C, const F *__restrict__ w, const F *__restrict__ u,
             const F *__restrict__ k, const F *__restrict__ v, F *__restrict__ y,
             F *__restrict__ aa, F *__restrict__ bb, F *__restrict__ pp, int n_threads) {
  const int blocks = (C + kBlock - 1) / kBlock;
  run_items(B * blocks, n_threads, [=](int item) {
    const int b = item / blocks, c0 = (item % blocks) * kBlock, n = std::min(kBlock, C - c0);
    F a[kBlock], d[kBlock], s[kBlock];
    std::copy(aa + b * C + c0, aa + b * C + c0 + n, a);
    std::copy(bb + b * C + c0, bb + b * C + c0 + n, d);
    std::copy(pp + b * C + c0, pp + b * C + c0 + n, s);
    for (int t = 0; t < T; ++t) {
      const int64_t row = (static_cast<int64_t>(b) * T + t) * C + c0;
      const F *kt = k + row, *vt = v + row;
      F *yt = y + row;
      for (int j = 0; j < n; ++j) {
        const F kk = kt[j], vv = vt[j];
        F now = u[c0 + j] + kk;
        F scale = std::max(s[j], now);
        F e_past = exp_of(s[j] - scale), e_now = exp_of(now - scale);
        yt[j] = (e_past * a[j] + e_now * vv) / (e_past * d[j] + e_now);
        const F decayed = w[c0 + j] + s[j];
        scale = std::max(decayed, kk);
        e_past = exp_of(decayed - scale);
        e_now = exp_of(kk - scale);
        a[j] = e_past * a[j] + e_now * vv;
        d[j] = e_past * d[j] + e_now;
        s[j] = scale;
      }
    }
    std::copy(a, a + n, aa + b * C + c0);
    std::copy(d, d + n, bb + b * C + c0);
    std::copy(s, s + n, pp + b * C + c0);
  });
}

// Gradients of y with respect to w, u (per sequence: gw, gu (B, C), summed by the caller), k and
// v, given gy and the forward's y; the carried-in state gets none. q and r are (B, T, C) scratch.
template <typename F>
void backward(int B, int T, int C, const F *__restrict__ w, const F *__restrict__ u,
              const F *__restrict__ k, const F *__restrict__ v, const F *__restrict__ y,
              const F *__restrict__ gy, const F *__restrict__ aa0, const F *__restrict__ bb0,
              const F *__restrict__ pp0, F *__restrict__ gw, F *__restrict__ gu,
              F *__restrict__ gk, F *__restrict__ gv, F *__restrict__ q, F *__restrict__ r,
              int n_threads) {
  const int blocks = (C + kBlock - 1) / kBlock;
  run_items(B * blocks, n_threads, [=](int item) {
    const int b = item / blocks, c0 = (item % blocks) * kBlock, n = std::min(kBlock, C - c0);
    // Forward in time: the state, its derivatives with respect to w (ga, gb, same log-scale),
    // and per token q = gy / denominator (scaled) and r = u + k - scale.
    F a[kBlock], d[kBlock], s[kBlock], ga[kBlock], gb[kBlock], sum_w[kBlock], sum_u[kBlock];
    for (int j = 0; j < n; ++j) {
      a[j] = aa0[b * C + c0 + j];
      d[j] = bb0[b * C + c0 + j];
      s[j] = pp0[b * C + c0 + j];
      ga[j] = gb[j] = sum_w[j] = sum_u[j] = 0;
    }
    for (int t = 0; t < T; ++t) {
      const int64_t row = (static_cast<int64_t>(b) * T + t) * C + c0;
      for (int j = 0; j < n; ++j) {
        const F kk = k[row + j], vv = v[row + j], yy = y[row + j];
        const F now = u[c0 + j] + kk;
        F scale = std::max(s[j], now);
        F e_past = exp_of(s[j] - scale), e_now = exp_of(now - scale);
        const F qq = gy[row + j] / (e_past * d[j] + e_now);
        sum_w[j] += (ga[j] - gb[j] * yy) * e_past * qq;
        sum_u[j] += (vv - yy) * e_now * qq;
        q[row + j] = qq;
        r[row + j] = now - scale;
        const F decayed = w[c0 + j] + s[j];
        scale = std::max(decayed, kk);
        e_past = exp_of(decayed - scale);
        e_now = exp_of(kk - scale);
        ga[j] = e_past * (a[j] + ga[j]);
        gb[j] = e_past * (d[j] + gb[j]);
        a[j] = e_past * a[j] + e_now * vv;
        d[j] = e_past * d[j] + e_now;
        s[j] = scale;
      }
    }
    for (int j = 0; j < n; ++j) {
      gw[b * C + c0 + j] = sum_w[j];
      gu[b * C + c0 + j] = sum_u[j];
    }
    // Backward in time: the gradient reaching the state after token t (numerator part ga,
    // denominator part gb, shared log-scale s), which is zero after the last token.
    for (int j = 0; j < n; ++j) {
      ga[j] = gb[j] = 0;
      s[j] = static_cast<F>(kEmptyLogScale);
    }
    for (int t = T - 1; t >= 0; --t) {
      const int64_t row = (static_cast<int64_t>(b) * T + t) * C + c0;
      for (int j = 0; j < n; ++j) {
        const F kk = k[row + j], vv = v[row + j], yy = y[row + j];
        const F qq = q[row + j], rr = r[row + j];
        F e_direct = qq * exp_of(rr), e_state = exp_of(kk + s[j]);
        gk[row + j] = e_direct * (vv - yy) + e_state * (ga[j] * vv + gb[j]);
        gv[row + j] = e_direct + e_state * ga[j];
        const F decayed = w[c0 + j] + s[j];
        const F inverse_scale = rr - u[c0 + j] - kk;
        const F scale = std::max(decayed, inverse_scale);
        const F e_carry = exp_of(decayed - scale), e_token = qq * exp_of(inverse_scale - scale);
        ga[j] = e_carry * ga[j] + e_token;
        gb[j] = e_carry * gb[j] - e_token * yy;
        s[j] = scale;
      }
    }
  });
}

}  // namespace

extern "C" {

int cmi_wkv_abi_version() { return 1; }

void cmi_wkv_forward_f32(int B, int T, int C, const float *w, const float *u, const float *k,
                         const float *v, float *y, float *aa, float *bb, float *pp, int n_threads) {
  forward(B, T, C, w, u, k, v, y, aa, bb, pp, n_threads);
}

void cmi_wkv_forward_f64(int B, int T, int C, const double *w, const double *u, const double *k,
                         const double *v, double *y, double *aa, double *bb, double *pp,
                         int n_threads) {
  forward(B, T, C, w, u, k, v, y, aa, bb, pp, n_threads);
}

void cmi_wkv_backward_f32(int B, int T, int C, const float *w, const float *u, const float *k,
                          const float *v, const float *y, const float *gy, const float *aa0,
                          const float *bb0, const float *pp0, float *gw, float *gu, float *gk,
                          float *gv, float *q, float *r, int n_threads) {
  backward(B, T, C, w, u, k, v, y, gy, aa0, bb0, pp0, gw, gu, gk, gv, q, r, n_threads);
}

void cmi_wkv_backward_f64(int B, int T, int C, const double *w, const double *u, const double *k,
                          const double *v, const double *y, const double *gy, const double *aa0,
                          const double *bb0, const double *pp0, double *gw, double *gu,
                          double *gk, double *gv, double *q, double *r, int n_threads) {
  backward(B, T, C, w, u, k, v, y, gy, aa0, bb0, pp0, gw, gu, gk, gv, q, r, n_threads);
}

}  // extern "C"
