// Softmax attention for XLA:CPU as XLA FFI handlers.
//
// Three handlers: forward (keeps p), inference (does not), backward.
//
// Layout: q, k, v, o and their gradients are (B, T, H, D) float32, the layout a
// dense projection's output has before any head transpose (any axes before B,
// as vmap adds them, count as batch); bias is a (B, T)
// additive key bias; p is (B, H, T, T), the softmax probabilities the forward
// keeps for the backward. Per (batch, head) every product is a small GEMM whose
// operands sit in L1/L2, so each (b, h) pair is one task; tasks are spread
// over XLA's intra-op thread pool.
//
//   forward:  p = softmax(q k^T + bias),  o = p v
//   backward: delta_i = do_i . o_i,  ds = p * (do v^T - delta),
//             dq = ds k,  dk = ds^T q,  dv = p^T do
//
// Padding costs nothing: the products stop after the last key not masked out
// and, in the backward, after the last query row with a nonzero cotangent;
// what they skip is exactly zero. With the attribute causal=true, token i also
// attends only to keys j <= i, and the products run in blocks of NR query (or,
// for dk and dv, key) rows that stop at the diagonal.
//
// The one GEMM kernel computes C[m, n] = sum_k A[m, k] B[k, n] with A read
// through (row, column) strides, so A^T costs nothing, and B row-major with
// N a multiple of the tile width.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int VW = 16;
#else
constexpr int VW = 8;
#endif
typedef float vec __attribute__((vector_size(VW * 4)));
typedef float uvec __attribute__((vector_size(VW * 4), aligned(4)));
typedef int ivec __attribute__((vector_size(VW * 4)));

constexpr int MR = 8;       // rows per register tile
constexpr int NR = 2 * VW;  // columns per register tile

inline vec load(const float* p) { return *reinterpret_cast<const uvec*>(p); }
inline void store(float* p, vec v) { *reinterpret_cast<uvec*>(p) = v; }
inline vec splat(float x) { return x - vec{}; }  // x - 0 is x exactly (x + 0 is not, for -0)

// C (M x N, leading dimension ldc) = A (M x K; A[m, k] = a[m * am + k * ak])
// times B (K x N; B[k, n] = b[k * ldb + n]). N % NR == 0.
void gemm(float* c, int64_t ldc, const float* a, int64_t am, int64_t ak, const float* b,
          int64_t ldb, int M, int N, int K) {
  for (int n0 = 0; n0 < N; n0 += NR) {
    int m0 = 0;
    for (; m0 + MR <= M; m0 += MR) {
      vec acc[MR][2];
      for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = vec{};
      const float* ap = a + m0 * am;
      const float* bp = b + n0;
      for (int k = 0; k < K; ++k, ap += ak, bp += ldb) {
        vec b0 = load(bp), b1 = load(bp + VW);
        for (int i = 0; i < MR; ++i) {
          vec ai = splat(ap[i * am]);
          acc[i][0] += ai * b0;
          acc[i][1] += ai * b1;
        }
      }
      for (int i = 0; i < MR; ++i) {
        float* cp = c + (m0 + i) * ldc + n0;
        store(cp, acc[i][0]);
        store(cp + VW, acc[i][1]);
      }
    }
    for (; m0 < M; ++m0) {  // leftover rows
      vec acc0 = vec{}, acc1 = vec{};
      const float* ap = a + m0 * am;
      const float* bp = b + n0;
      for (int k = 0; k < K; ++k, ap += ak, bp += ldb) {
        vec ai = splat(*ap);
        acc0 += ai * load(bp);
        acc1 += ai * load(bp + VW);
      }
      float* cp = c + m0 * ldc + n0;
      store(cp, acc0);
      store(cp + VW, acc1);
    }
  }
}

// exp(x) for x <= 0 (softmax after subtracting the row maximum): 2^n * P(r),
// r = x - n ln2 in [-ln2/2, ln2/2], P the degree-6 Taylor/Cephes polynomial;
// relative error below 2e-7. Arguments under -87 flush to 0.
inline vec vexp(vec x) {
  const vec lo = splat(-87.3f);
  x = x < lo ? lo : x;
  const vec shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vec n = (x * splat(1.44269504088896341f) + shifter) - shifter;
  vec r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  vec p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  ivec e = (__builtin_convertvector(n, ivec) + 127) << 23;
  vec scale;
  std::memcpy(&scale, &e, sizeof(scale));
  vec out = p * scale;
  return x <= lo ? vec{} : out;
}

inline float hmax(vec v) {
  float m = v[0];
  for (int i = 1; i < VW; ++i) m = std::max(m, v[i]);
  return m;
}
inline float hsum(vec v) {
  float s = 0.f;
  for (int i = 0; i < VW; ++i) s += v[i];
  return s;
}

// Runs body(i) for i in [0, n) on the calling thread and the pool. Each task
// claims indices from a shared counter, so the caller never waits on a task
// that has not started: a task scheduled behind a busy pool finds nothing left.
template <typename Body>
void parallel_for(ffi::ThreadPool& pool, int64_t n, Body body) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, body]() {
    int64_t mine = 0;
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      body(i);
      ++mine;
    }
    if (mine && state->done.fetch_add(mine) + mine == n) {
      std::lock_guard<std::mutex> lock(state->mu);
      state->cv.notify_all();
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

struct Shape {
  int64_t B, T, H, D;
};

// (..., T, H, D): every leading axis is batch (vmap adds them in front).
ffi::Error check(const ffi::Buffer<ffi::F32>& q, Shape* s) {
  auto d = q.dimensions();
  const size_t r = d.size();
  if (r < 4) return ffi::Error::InvalidArgument("attention expects (..., B, T, H, D) inputs");
  int64_t batch = 1;
  for (size_t i = 0; i + 3 < r; ++i) batch *= d[i];
  *s = {batch, d[r - 3], d[r - 2], d[r - 1]};
  if (s->D % NR != 0 || s->T % NR != 0)
    return ffi::Error::InvalidArgument("attention kernel needs T and D multiples of the tile width");
  return ffi::Error::Success();
}

// Per-thread working memory, grown on demand and kept for the next call.
float* scratch(int64_t n) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// The first n columns of t (D x ldt) = x^T for one head's first n rows x
// (n x D, row stride ld). Writing t row by row (contiguous stores) takes half
// the time of writing it column by column: 5 against 11 us per (batch, head)
// at T = 128, D = 32 on one core.
void transpose(float* t, int64_t ldt, const float* x, int64_t ld, int64_t n, int64_t D) {
  for (int64_t d = 0; d < D; ++d)
    for (int64_t j = 0; j < n; ++j) t[d * ldt + j] = x[j * ld + d];
}

// Keys past the last one whose bias is above -1e30 get exactly zero weight
// (exp underflows), so every product stops there: the extent, rounded up to the
// vector width (T when no key is kept, where softmax is uniform over all keys).
constexpr float MASKED = -1e30f;

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

int64_t key_extent(const float* kb, int64_t T) {
  int64_t last = T - 1;
  while (last >= 0 && kb[last] <= MASKED) --last;
  return last < 0 ? T : std::min(T, round_up(last + 1, VW));
}

// Query rows past the last one with a nonzero output cotangent have zero
// gradients (a padded token's output reaches no loss), so the backward stops
// there too, at a multiple of 8 rows.
int64_t query_extent(const float* dout, int64_t ld, int64_t T, int64_t D) {
  int64_t last = T - 1;
  for (; last >= 0; --last) {
    const float* row = dout + last * ld;
    if (std::any_of(row, row + D, [](float x) { return x != 0.0f; })) break;
  }
  return std::min(T, round_up(last + 1, 8));
}

void zero_rows(float* x, int64_t ld, int64_t from, int64_t to, int64_t D) {
  for (int64_t i = from; i < to; ++i) std::memset(x + i * ld, 0, D * sizeof(float));
}

// How many of the first n keys rows before `end` see: all n, or under a causal
// mask those before `end`. For row i (end = i + 1) the scores are written for
// j < round_up(extent, VW), lanes past the extent set to -inf (exp gives 0).
inline int64_t keys_seen(int64_t n, int64_t end, bool causal) {
  return causal ? std::min(n, end) : n;
}

inline vec lane_index() {
  vec idx;
  for (int i = 0; i < VW; ++i) idx[i] = static_cast<float>(i);
  return idx;
}

// Under a causal mask rows go in chunks of NR whose products stop after the
// chunk's last row (about 5/8 of the full products at T = 128); otherwise one
// chunk of T rows.
inline int64_t row_chunk(int64_t T, bool causal) { return causal ? NR : T; }

// KEEP_P: write p for the backward pass; otherwise one (b, h) pair's p lives in
// per-thread scratch (inference).
template <bool KEEP_P>
ffi::Error Forward(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& q,
                   const ffi::Buffer<ffi::F32>& k, const ffi::Buffer<ffi::F32>& v,
                   const ffi::Buffer<ffi::F32>& bias, bool causal, float* O, float* P) {
  Shape s;
  if (auto e = check(q, &s); e.failure()) return e;
  const int64_t B = s.B, T = s.T, H = s.H, D = s.D, ld = H * D;
  const float *Q = q.typed_data(), *K = k.typed_data(), *V = v.typed_data(),
              *bias_ = bias.typed_data();
  const int64_t chunk = row_chunk(T, causal);
  parallel_for(pool, B * H, [=](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    const int64_t base = b * T * ld + h * D;
    float* kt = scratch(D * T + (KEEP_P ? 0 : T * T));
    float* pr = KEEP_P ? P + bh * T * T : kt + D * T;
    const float* kb = bias_ + b * T;
    const int64_t ke = key_extent(kb, T), kn = round_up(ke, NR);
    const vec lanes = lane_index();
    transpose(kt, T, K + base, ld, kn, D);
    for (int64_t r0 = 0; r0 < T; r0 += chunk) {
      // the chunk's keys: ke for all rows, or (causal) up to its last row
      const int64_t kc = keys_seen(kn, r0 + chunk, causal), kv = keys_seen(ke, r0 + chunk, causal);
      gemm(pr + r0 * T, T, Q + base + r0 * ld, ld, 1, kt, T, chunk, kc, D);
      for (int64_t i = r0; i < r0 + chunk; ++i) {
        float* row = pr + i * T;
        const int64_t ei = keys_seen(ke, i + 1, causal), ev = round_up(ei, VW);
        vec m = splat(-INFINITY);
        for (int64_t j = 0; j < ev; j += VW) {
          vec x = load(row + j) + load(kb + j);
          if (j + VW > ei) x = lanes + splat(static_cast<float>(j)) < splat(ei) ? x : splat(-INFINITY);
          store(row + j, x);
          m = m > x ? m : x;
        }
        const vec mx = splat(hmax(m));
        vec sum = vec{};
        for (int64_t j = 0; j < ev; j += VW) {
          vec e = vexp(load(row + j) - mx);
          store(row + j, e);
          sum += e;
        }
        const vec inv = splat(1.0f / hsum(sum));
        for (int64_t j = 0; j < ev; j += VW) store(row + j, load(row + j) * inv);
        std::memset(row + ev, 0, ((KEEP_P ? T : kv) - ev) * sizeof(float));
      }
      gemm(O + base + r0 * ld, ld, pr + r0 * T, T, 1, V + base, ld, chunk, D, kv);
    }
  });
  return ffi::Error::Success();
}

ffi::Error AttentionForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> bias,
                            ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> p, bool causal) {
  return Forward<true>(pool, q, k, v, bias, causal, o->typed_data(), p->typed_data());
}

ffi::Error AttentionInference(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                              ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                              ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> o,
                              bool causal) {
  return Forward<false>(pool, q, k, v, bias, causal, o->typed_data(), nullptr);
}

ffi::Error AttentionBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                             ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> p,
                             ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> dout,
                             ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> dq,
                             ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                             bool causal) {
  Shape s;
  if (auto e = check(q, &s); e.failure()) return e;
  const int64_t B = s.B, T = s.T, H = s.H, D = s.D, ld = H * D;
  const float *Q = q.typed_data(), *K = k.typed_data(), *V = v.typed_data(), *P = p.typed_data(),
              *O = o.typed_data(), *dO = dout.typed_data(), *bias_ = bias.typed_data();
  float *dQ = dq->typed_data(), *dK = dk->typed_data(), *dV = dv->typed_data();
  const int64_t chunk = row_chunk(T, causal);
  parallel_for(pool, B * H, [=](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    const int64_t base = b * T * ld + h * D;
    float* vt = scratch(D * T + T * T);
    float* ds = vt + D * T;
    const float* pr = P + bh * T * T;
    const int64_t ke = key_extent(bias_ + b * T, T), kn = round_up(ke, NR);
    const int64_t me = query_extent(dO + base, ld, T, D);
    transpose(vt, T, V + base, ld, kn, D);
    // query rows in chunks: dp = do v^T, ds = p * (dp - delta), dq = ds k
    for (int64_t r0 = 0; r0 < me; r0 += chunk) {
      const int64_t rows = std::min(chunk, me - r0);
      const int64_t kc = keys_seen(kn, r0 + chunk, causal), kv = keys_seen(ke, r0 + chunk, causal);
      gemm(ds + r0 * T, T, dO + base + r0 * ld, ld, 1, vt, T, rows, kc, D);
      for (int64_t i = r0; i < r0 + rows; ++i) {
        const float *doi = dO + base + i * ld, *oi = O + base + i * ld;
        vec acc = vec{};
        for (int64_t d = 0; d < D; d += VW) acc += load(doi + d) * load(oi + d);
        const vec delta = splat(hsum(acc));
        float* row = ds + i * T;
        const float* prow = pr + i * T;
        const int64_t ev = round_up(keys_seen(ke, i + 1, causal), VW);
        for (int64_t j = 0; j < ev; j += VW) store(row + j, load(prow + j) * (load(row + j) - delta));
        std::memset(row + ev, 0, (kv - ev) * sizeof(float));  // p is 0 there
      }
      gemm(dQ + base + r0 * ld, ld, ds + r0 * T, T, 1, K + base, ld, rows, D, kv);
    }
    // key rows in chunks: dv = p^T do, dk = ds^T q over the query rows that see them
    for (int64_t j0 = 0; j0 < ke; j0 += chunk) {
      const int64_t keys = std::min(chunk, ke - j0), i0 = causal ? j0 : 0;
      if (i0 >= me) {
        zero_rows(dV + base, ld, j0, j0 + keys, D);
        zero_rows(dK + base, ld, j0, j0 + keys, D);
        continue;
      }
      gemm(dV + base + j0 * ld, ld, pr + i0 * T + j0, 1, T, dO + base + i0 * ld, ld, keys, D, me - i0);
      gemm(dK + base + j0 * ld, ld, ds + i0 * T + j0, 1, T, Q + base + i0 * ld, ld, keys, D, me - i0);
    }
    zero_rows(dV + base, ld, ke, T, D);
    zero_rows(dK + base, ld, ke, T, D);
    zero_rows(dQ + base, ld, me, T, D);
  });
  return ffi::Error::Success();
}

// Every handler takes the thread pool and q, k, v and one more (B, T, H, D)-sized
// or (B, T) operand: the bias, or (backward) p.
auto AttentionBinding() {
  using F32 = ffi::Buffer<ffi::F32>;
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>();
}

}  // namespace

using F32 = ffi::Buffer<ffi::F32>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JloraAttentionForward, AttentionForward,
                              AttentionBinding().Ret<F32>().Ret<F32>()  // o, p
                                  .Attr<bool>("causal"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JloraAttentionInference, AttentionInference,
                              AttentionBinding().Ret<F32>().Attr<bool>("causal"));  // o

XLA_FFI_DEFINE_HANDLER_SYMBOL(JloraAttentionBackward, AttentionBackward,
                              AttentionBinding()  // q, k, v, p
                                  .Arg<F32>().Arg<F32>().Arg<F32>()  // o, do, bias
                                  .Ret<F32>().Ret<F32>().Ret<F32>()  // dq, dk, dv
                                  .Attr<bool>("causal"));
