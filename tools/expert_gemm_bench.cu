// Which cuBLAS call should run the routed experts' GEMMs? A device-side microbenchmark for that
// decision (issue "CUDA backend": the experts' grouped GEMM was ~40 % of a prefill). cuBLAS's
// grouped GEMM (grouped_matmul's path before the padded plan) runs warp-level MMA kernels (~280
// TFLOP/s in a training trace on the H200), while its plain and batched GEMMs run Hopper's
// warpgroup kernels; its first run chose the padded batched path (bench/RESULTS.md).
// Same work in every variant: the gate (or up) projection of E experts, C_e [M_e, N] = X_e [M_e,
// K] W_e^T with W_e [N, K], bf16 in and out, fp32 accumulation, M_e drawn as the rows a random
// top-k routing of T tokens gives each expert. Variants:
//   grouped      cublasGemmGroupedBatchedEx, one group per expert (unpadded plans)
//   loop         one cublasGemmEx per expert, one stream
//   classes      experts padded to a multiple of 128 rows, one cublasGemmBatchedEx per padded size
//   classes-x2   the same with two projections (gate and up) in each class's call: 2x the problems
//   blocks       every 128-row block of every expert one problem of a single batched call (m 128)
//   blocks-x2    the same for two projections in one call
//   base+blocks  the rows every expert has (the smallest padded size) in one batched call of E
//                problems, the 128-row blocks past it in a second call (m 128); -x2 for two
// TFLOP/s count the real (unpadded) FLOPs (of both projections in the -x2 variants). Built and run
// by `tools/device_run.sh gemmbench`:
//   nvcc -O2 -std=c++17 -arch=sm_90 tools/expert_gemm_bench.cu -lcublas -o /tmp/expert_gemm_bench
//   /tmp/expert_gemm_bench [T=8192] [E=64] [K=6] [N=1408] [H=2048] [SKEW=0]
// SKEW > 0 draws each expert's popularity as exp(SKEW z), z standard normal, instead of uniform
// (a trained or randomly initialised router is not uniform: the model bench sees ~6 class sizes).
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <random>
#include <vector>

#define CHECK_CUDA(x)                                                                 \
  do {                                                                                \
    cudaError_t e_ = (x);                                                             \
    if (e_ != cudaSuccess) {                                                          \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)
#define CHECK_CUBLAS(x)                                                         \
  do {                                                                          \
    cublasStatus_t s_ = (x);                                                    \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                          \
      std::fprintf(stderr, "%s:%d cuBLAS status %d\n", __FILE__, __LINE__, s_); \
      std::exit(1);                                                             \
    }                                                                           \
  } while (0)

// Milliseconds per call of f, after a warm-up, averaged over `reps` calls between two events.
double time_ms(const std::function<void()>& f, int reps = 20) {
  f();
  CHECK_CUDA(cudaDeviceSynchronize());
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  CHECK_CUDA(cudaEventRecord(a));
  for (int i = 0; i < reps; ++i) f();
  CHECK_CUDA(cudaEventRecord(b));
  CHECK_CUDA(cudaEventSynchronize(b));
  float ms = 0.0f;
  CHECK_CUDA(cudaEventElapsedTime(&ms, a, b));
  return double(ms) / reps;
}

int main(int argc, char** argv) {
  const int T = argc > 1 ? std::atoi(argv[1]) : 8192, E = argc > 2 ? std::atoi(argv[2]) : 64;
  const int top_k = argc > 3 ? std::atoi(argv[3]) : 6, N = argc > 4 ? std::atoi(argv[4]) : 1408;
  const int H = argc > 5 ? std::atoi(argv[5]) : 2048;  // K of the GEMM
  const double skew = argc > 6 ? std::atof(argv[6]) : 0.0;
  // Rows per expert: top_k distinct experts per token, at random by each expert's popularity.
  std::mt19937_64 rng(1);
  std::vector<double> pop(size_t(E), 1.0);
  std::normal_distribution<double> z;
  if (skew > 0)
    for (double& p : pop) p = std::exp(skew * z(rng));
  std::vector<int> rows(size_t(E), 0);
  for (int t = 0; t < T; ++t) {
    std::vector<double> w = pop;
    for (int k = 0; k < top_k; ++k) {
      std::discrete_distribution<int> pick(w.begin(), w.end());
      const int e = pick(rng);
      ++rows[size_t(e)];
      w[size_t(e)] = 0.0;  // distinct experts per token
    }
  }
  auto round128 = [](int m) { return (m + 127) / 128 * 128; };
  // Each expert's block in X and C: the largest expert's rows padded to 128, so every padded
  // variant finds its padding rows there.
  const int max_rows = round128(*std::max_element(rows.begin(), rows.end()));
  long long total = 0, padded_total = 0;
  for (int m : rows) {
    total += m;
    padded_total += round128(m);
  }
  const double flops = 2.0 * double(total) * N * H;
  std::printf("T %d, E %d, top-%d: rows per expert %lld total, min %d, max %d; N %d, K %d\n", T, E,
              top_k, total, *std::min_element(rows.begin(), rows.end()), max_rows, N, H);

  // X: every expert's rows, each expert's block padded to max_rows (so every variant can read
  // its padding); W: E weights; C: outputs laid out as X.
  const size_t x_elems = size_t(E) * max_rows * H, w_elems = size_t(E) * N * H;
  const size_t c_elems = size_t(E) * max_rows * N;
  __nv_bfloat16 *X, *W, *C;
  CHECK_CUDA(cudaMalloc(&X, x_elems * 2));
  CHECK_CUDA(cudaMalloc(&W, w_elems * 2));
  CHECK_CUDA(cudaMalloc(&C, c_elems * 2));
  CHECK_CUDA(cudaMemset(X, 0x3c, x_elems * 2));  // small finite values
  CHECK_CUDA(cudaMemset(W, 0x3c, w_elems * 2));
  cublasHandle_t h;
  CHECK_CUBLAS(cublasCreate(&h));
  const float one = 1.0f, zero = 0.0f;
  auto x_of = [&](int e) { return X + size_t(e) * max_rows * H; };
  auto w_of = [&](int e) { return W + size_t(e) * N * H; };
  auto c_of = [&](int e) { return C + size_t(e) * max_rows * N; };
  // Row-major C [m, N] = X [m, H] W^T is column-major C^T [N, m] = W^T(op T of W's [H, N]) X^T.
  auto gemm = [&](int e, int m) {
    CHECK_CUBLAS(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, m, H, &one, w_of(e), CUDA_R_16BF, H,
                              x_of(e), CUDA_R_16BF, H, &zero, c_of(e), CUDA_R_16BF, N,
                              CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  };
  auto report = [&](const char* name, double ms) {
    std::printf("%-12s %8.3f ms  %6.1f TFLOP/s\n", name, ms, flops / (ms * 1e-3) / 1e12);
  };

  // grouped: one group per expert (group_size 1 each).
  {
    std::vector<cublasOperation_t> ta(size_t(E), CUBLAS_OP_T), tb(size_t(E), CUBLAS_OP_N);
    std::vector<int> m(size_t(E), N), n(rows), k(size_t(E), H), ld_w(size_t(E), H);
    std::vector<int> ld_x(size_t(E), H), ld_c(size_t(E), N), sizes(size_t(E), 1);
    std::vector<float> alphas(size_t(E), 1.0f), betas(size_t(E), 0.0f);
    std::vector<const void*> host(size_t(3 * E));
    for (int e = 0; e < E; ++e) {
      host[size_t(e)] = w_of(e);
      host[size_t(E + e)] = x_of(e);
      host[size_t(2 * E + e)] = c_of(e);
    }
    void** dev = nullptr;
    CHECK_CUDA(cudaMalloc(&dev, host.size() * sizeof(void*)));
    CHECK_CUDA(cudaMemcpy(dev, host.data(), host.size() * sizeof(void*), cudaMemcpyHostToDevice));
    report("grouped", time_ms([&] {
             CHECK_CUBLAS(cublasGemmGroupedBatchedEx(
                 h, ta.data(), tb.data(), m.data(), n.data(), k.data(), alphas.data(),
                 const_cast<const void* const*>(dev), CUDA_R_16BF, ld_w.data(),
                 const_cast<const void* const*>(dev + E), CUDA_R_16BF, ld_x.data(), betas.data(),
                 dev + 2 * E, CUDA_R_16BF, ld_c.data(), E, sizes.data(), CUBLAS_COMPUTE_32F));
           }));
  }
  report("loop", time_ms([&] {
           for (int e = 0; e < E; ++e) gemm(e, rows[size_t(e)]);
         }));
  // A batched call over `probs` (weight, rows, output) problems of m rows each, for the padded
  // variants below: the pointer arrays uploaded once, outside the timing.
  struct Problem {
    const void* w;
    const void* x;
    void* c;
  };
  auto batched = [&](const std::vector<Problem>& probs, int m) {
    std::vector<const void*> host;
    for (const Problem& p : probs) host.push_back(p.w);
    for (const Problem& p : probs) host.push_back(p.x);
    for (const Problem& p : probs) host.push_back(p.c);
    void** dev = nullptr;
    CHECK_CUDA(cudaMalloc(&dev, host.size() * sizeof(void*)));
    CHECK_CUDA(cudaMemcpy(dev, host.data(), host.size() * sizeof(void*), cudaMemcpyHostToDevice));
    const int b = int(probs.size());
    return std::function<void()>([=, &h, &one, &zero] {
      CHECK_CUBLAS(cublasGemmBatchedEx(
          h, CUBLAS_OP_T, CUBLAS_OP_N, N, m, H, &one, const_cast<const void* const*>(dev),
          CUDA_R_16BF, H, const_cast<const void* const*>(dev + b), CUDA_R_16BF, H, &zero,
          dev + 2 * b, CUDA_R_16BF, N, b, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    });
  };
  // The second projection's weights and outputs (the first's reused as its weights' values).
  __nv_bfloat16 *W2, *C2;
  CHECK_CUDA(cudaMalloc(&W2, w_elems * 2));
  CHECK_CUDA(cudaMalloc(&C2, c_elems * 2));
  CHECK_CUDA(cudaMemset(W2, 0x3c, w_elems * 2));
  auto w2_of = [&](int e) { return W2 + size_t(e) * N * H; };
  auto c2_of = [&](int e) { return C2 + size_t(e) * max_rows * N; };
  auto report2 = [&](const char* name, double ms) {  // two projections' FLOPs
    std::printf("%-12s %8.3f ms  %6.1f TFLOP/s\n", name, ms, 2 * flops / (ms * 1e-3) / 1e12);
  };
  for (int proj = 1; proj <= 2; ++proj) {
    // classes: experts grouped by their row count rounded up to 128, one batched call per class,
    // each call with `proj` projections.
    std::map<int, std::vector<int>> classes;
    for (int e = 0; e < E; ++e) classes[round128(rows[size_t(e)])].push_back(e);
    if (proj == 1)
      std::printf("classes: %zu sizes, %.1f %% padding\n", classes.size(),
                  100.0 * double(padded_total - total) / double(total));
    std::vector<std::function<void()>> cls, blk, bb;
    for (auto& [m, es] : classes) {
      std::vector<Problem> probs;
      for (int e : es) probs.push_back({w_of(e), x_of(e), c_of(e)});
      if (proj == 2)
        for (int e : es) probs.push_back({w2_of(e), x_of(e), c2_of(e)});
      cls.push_back(batched(probs, std::min(m, max_rows)));
    }
    // blocks: every 128-row block (within max_rows) one problem.
    std::vector<Problem> blocks, base, rest;
    const int m0 = std::min(classes.begin()->first, max_rows);
    for (int p = 0; p < proj; ++p)
      for (int e = 0; e < E; ++e) {
        auto w = p ? w2_of(e) : w_of(e);
        auto c = p ? c2_of(e) : c_of(e);
        for (int r = 0; r < round128(rows[size_t(e)]) && r + 128 <= max_rows; r += 128) {
          blocks.push_back({w, x_of(e) + size_t(r) * H, c + size_t(r) * N});
          if (r >= m0) rest.push_back({w, x_of(e) + size_t(r) * H, c + size_t(r) * N});
        }
        base.push_back({w, x_of(e), c});
      }
    blk.push_back(batched(blocks, 128));
    bb.push_back(batched(base, m0));
    if (!rest.empty()) bb.push_back(batched(rest, 128));
    auto all = [](const std::vector<std::function<void()>>& fs) {
      return [&fs] {
        for (const auto& f : fs) f();
      };
    };
    auto rep = [&](const char* name, double ms) {
      proj == 1 ? report(name, ms) : report2(name, ms);
    };
    rep(proj == 1 ? "classes" : "classes-x2", time_ms(all(cls)));
    rep(proj == 1 ? "blocks" : "blocks-x2", time_ms(all(blk)));
    rep(proj == 1 ? "base+blocks" : "base+blk-x2", time_ms(all(bb)));
  }
  report("padded-max", time_ms([&] {
           CHECK_CUBLAS(cublasGemmStridedBatchedEx(
               h, CUBLAS_OP_T, CUBLAS_OP_N, N, max_rows, H, &one, W, CUDA_R_16BF, H,
               (long long)N * H, X, CUDA_R_16BF, H, (long long)max_rows * H, &zero, C, CUDA_R_16BF,
               N, (long long)max_rows * N, E, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
         }));
  // One dense GEMM of all rows against one weight: the ceiling these shapes allow.
  report("dense", time_ms([&] {
           CHECK_CUBLAS(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, int(total), H, &one, W,
                                     CUDA_R_16BF, H, X, CUDA_R_16BF, H, &zero, C, CUDA_R_16BF, N,
                                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
         }));
  return 0;
}
