// CUDA backend, host side part 1: device discovery, the caching allocator, copies and fills, GEMM
// and the experts' grouped GEMM and weight gradients through cuBLAS (fp32, or bf16/bf16 inputs
// with fp32 accumulation), add/scale, index checks.
// Compiled by the C++ compiler (fmt's compile-time format checks do not pass nvcc); the kernels
// are behind ops/cuda/kernels.h.
//
// Start-up cost: the CUDA runtime is linked statically (it loads the driver only on the first CUDA
// call) and cuBLAS is not linked at all but dlopen()ed when the backend is created, so a process
// that never touches Device::CUDA pays nothing for it (loading libcublas and libcublasLt takes
// about 0.45 s, which a CLI-heavy test suite paid per process).
#include <cublas_v2.h>
#include <dlfcn.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/profile.h"
#include "ops/cuda/cuda_backend.h"
#include "ops/cuda/cuda_util.h"
#include "ops/cuda/kernels.h"
#include "ops/cuda/stream.h"

namespace moekit {

using cuda::check;

cudaStream_t cuda::stream() {
  // Created on first use, never destroyed (like the backend). Blocking (cudaStreamDefault):
  // work on the legacy stream, such as a plain cudaMemcpy, still waits for it.
  static const cudaStream_t s = [] {
    cudaStream_t st = nullptr;
    check(cudaStreamCreateWithFlags(&st, cudaStreamDefault), "stream (cudaStreamCreate)");
    return st;
  }();
  return s;
}

bool cuda::dependent_launch_enabled() {
  static const bool on = [] {
    const char* env = std::getenv("MOEKIT_CUDA_PDL");
    if (env != nullptr && std::string(env) == "0") return false;
    int device = 0, major = 0;
    return cudaGetDevice(&device) == cudaSuccess &&
           cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) ==
               cudaSuccess &&
           major >= 9;
  }();
  return on;
}

Backend* cuda_backend() {
  // Created once; never destroyed, so tensors released during static destruction still find it.
  static CudaBackend* instance = []() -> CudaBackend* {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
      cudaGetLastError();  // clear the sticky "no device" status
      return nullptr;
    }
    return new CudaBackend();
  }();
  return instance;
}

namespace {

const char* cublas_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED:
      return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH:
      return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_EXECUTION_FAILED:
      return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "CUBLAS_STATUS_NOT_SUPPORTED";
    default:
      return "cuBLAS error";
  }
}

void check_cublas(cublasStatus_t s, const char* op) {
  if (s != CUBLAS_STATUS_SUCCESS) fail("CUDA {}: {} ({})", op, cublas_name(s), int(s));
}

#ifndef MOEKIT_CUBLAS_SONAME
#define MOEKIT_CUBLAS_SONAME "libcublas.so"
#endif
#ifndef MOEKIT_CUBLAS_DIR
#define MOEKIT_CUBLAS_DIR ""
#endif

// The cuBLAS entry points moekit uses, resolved from the library loaded at run time.
struct Cublas {
  decltype(&cublasCreate_v2) create = nullptr;
  decltype(&cublasSetMathMode) set_math_mode = nullptr;
  decltype(&cublasSetStream_v2) set_stream = nullptr;
  cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                            const void*, const void*, cudaDataType, int, const void*, cudaDataType,
                            int, const void*, void*, cudaDataType, int, cublasComputeType_t,
                            cublasGemmAlgo_t) = nullptr;
  cublasStatus_t (*gemm_strided_batched_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t,
                                            int, int, int, const void*, const void*, cudaDataType,
                                            int, long long, const void*, cudaDataType, int,
                                            long long, const void*, void*, cudaDataType, int,
                                            long long, int, cublasComputeType_t,
                                            cublasGemmAlgo_t) = nullptr;
  cublasStatus_t (*gemm_batched_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int,
                                    int, const void*, const void* const[], cudaDataType, int,
                                    const void* const[], cudaDataType, int, const void*,
                                    void* const[], cudaDataType, int, int, cublasComputeType_t,
                                    cublasGemmAlgo_t) = nullptr;
  // cuBLAS >= 12.5 only; null with an older library (grouped_matmul then loops over gemm_ex).
  decltype(&cublasGemmGroupedBatchedEx) gemm_grouped = nullptr;
};

// Loads cuBLAS once: by soname (LD_LIBRARY_PATH, the loader cache), then from the toolkit's
// library directory recorded at build time, then from the usual toolkit location.
const Cublas& cublas() {
  static const Cublas api = [] {
    void* lib = dlopen(MOEKIT_CUBLAS_SONAME, RTLD_NOW | RTLD_LOCAL);
    std::string first_error = lib ? "" : dlerror();
    for (const char* dir : {MOEKIT_CUBLAS_DIR, "/usr/local/cuda/lib64"})
      if (!lib && *dir)
        lib =
            dlopen((std::string(dir) + "/" + MOEKIT_CUBLAS_SONAME).c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!lib)
      fail("CUDA: cannot load cuBLAS ({}); add the CUDA toolkit's lib64 to LD_LIBRARY_PATH",
           first_error);
    Cublas c;
    auto sym = [&](const char* name) {
      void* f = dlsym(lib, name);
      if (!f) fail("CUDA: {} has no symbol {}", MOEKIT_CUBLAS_SONAME, name);
      return f;
    };
    c.create = reinterpret_cast<decltype(c.create)>(sym("cublasCreate_v2"));
    c.set_math_mode = reinterpret_cast<decltype(c.set_math_mode)>(sym("cublasSetMathMode"));
    c.set_stream = reinterpret_cast<decltype(c.set_stream)>(sym("cublasSetStream_v2"));
    c.gemm_ex = reinterpret_cast<decltype(c.gemm_ex)>(sym("cublasGemmEx"));
    c.gemm_strided_batched_ex =
        reinterpret_cast<decltype(c.gemm_strided_batched_ex)>(sym("cublasGemmStridedBatchedEx"));
    c.gemm_batched_ex = reinterpret_cast<decltype(c.gemm_batched_ex)>(sym("cublasGemmBatchedEx"));
    c.gemm_grouped =
        reinterpret_cast<decltype(c.gemm_grouped)>(dlsym(lib, "cublasGemmGroupedBatchedEx"));
    return c;
  }();
  return api;
}

}  // namespace

CudaBackend::CudaBackend() {
  cublasHandle_t h = nullptr;
  check_cublas(cublas().create(&h), "cublasCreate");
  // Default math: fp32 GEMMs stay fp32 (no TF32 unless NVIDIA_TF32_OVERRIDE=1 is set), bf16
  // GEMMs use the tensor cores with fp32 accumulation.
  check_cublas(cublas().set_math_mode(h, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
  check_cublas(cublas().set_stream(h, cuda::stream()), "cublasSetStream");
  cublas_ = h;
  void* slot = nullptr;
  check(cudaMalloc(&slot, sizeof(cuda::IndexError)), "index error slot (cudaMalloc)");
  index_error_ = static_cast<cuda::IndexError*>(slot);
  check(cudaMemset(index_error_, 0, sizeof(cuda::IndexError)), "index error slot (cudaMemset)");
  check(cudaMallocHost(&slot, sizeof(cuda::IndexError)), "index error staging (cudaMallocHost)");
  error_staging_ = static_cast<cuda::IndexError*>(slot);
  // How the bf16 expert GEMMs run (grouped_matmul, ExpertGemm): "batched" (the default), "own"
  // (a Hopper GPU and an sm_90a build only), "grouped" or "streams".
  static const char* const kExpertGemms[] = {"own", "batched", "grouped", "streams"};
  switch (env_choice("MOEKIT_CUDA_EXPERT_GEMM", kExpertGemms, 1)) {
    case 0:
      if (!cuda::expert_gemm_available())
        fail(
            "MOEKIT_CUDA_EXPERT_GEMM=own needs a Hopper GPU (compute capability 9.0) and a build "
            "for sm_90a");
      expert_gemm_ = ExpertGemm::Own;
      break;
    case 2:
      expert_gemm_ = ExpertGemm::Grouped;
      break;
    case 3:
      expert_gemm_ = ExpertGemm::Streams;
      break;
    default:
      expert_gemm_ = ExpertGemm::Batched;
  }
  // How the padded blocks make batched problems (grouped_matmul_batched, ExpertBatch).
  static const char* const kExpertBatches[] = {"classes", "blocks", "base"};
  static const ExpertBatch kBatchOf[] = {ExpertBatch::Classes, ExpertBatch::Blocks,
                                         ExpertBatch::Base};
  const size_t batch = env_choice("MOEKIT_CUDA_EXPERT_BATCH", kExpertBatches, 3);
  if (batch < 3) expert_batch_ = kBatchOf[batch];

  // The initial precision of F32 GEMMs and attention, as a user's choice (Precision in ops.h):
  // "fp32" (exact, the default, which the CPU-parity tests rely on), "tf32" or "bf16".
  static const char* const kPrecisions[] = {"fp32", "tf32", "bf16"};
  static const Precision kPrecisionOf[] = {Precision::Fp32, Precision::Tf32, Precision::Bf16};
  const size_t precision = env_choice("MOEKIT_CUDA_FP32_GEMM", kPrecisions, 3);
  if (precision < 3) precision_ = kPrecisionOf[precision];
}

size_t env_choice(const char* name, std::span<const char* const> choices, size_t unset) {
  const char* value = std::getenv(name);
  if (value == nullptr) return unset;
  std::string list;
  for (size_t i = 0; i < choices.size(); ++i) {
    if (std::string_view(value) == choices[i]) return i;
    list += (i == 0 ? "" : i + 1 == choices.size() ? " or " : ", ") + std::string(choices[i]);
  }
  fail("{} must be {}, got \"{}\"", name, list, value);
}

void CudaBackend::fork_side_streams(size_t n) {
  if (side_streams_.empty()) {
    for (size_t i = 0; i < kSideStreams; ++i) {
      cudaStream_t st = nullptr;
      check(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), "side stream");
      cublasHandle_t h = nullptr;
      check_cublas(cublas().create(&h), "cublasCreate");
      check_cublas(cublas().set_math_mode(h, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
      check_cublas(cublas().set_stream(h, st), "cublasSetStream");
      cudaEvent_t done = nullptr;
      check(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), "side stream event");
      side_streams_.push_back(st);
      side_cublas_.push_back(h);
      side_done_.push_back(done);
    }
    cudaEvent_t fork = nullptr;
    check(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming), "side stream event");
    side_fork_ = fork;
  }
  auto fork = static_cast<cudaEvent_t>(side_fork_);
  check(cudaEventRecord(fork, cuda::stream()), "fork (cudaEventRecord)");
  for (size_t i = 0; i < n; ++i)
    check(cudaStreamWaitEvent(static_cast<cudaStream_t>(side_streams_[i]), fork, 0),
          "fork (cudaStreamWaitEvent)");
}

void CudaBackend::join_side_streams(size_t n) {
  for (size_t i = 0; i < n; ++i) {
    auto done = static_cast<cudaEvent_t>(side_done_[i]);
    check(cudaEventRecord(done, static_cast<cudaStream_t>(side_streams_[i])),
          "join (cudaEventRecord)");
    check(cudaStreamWaitEvent(cuda::stream(), done, 0), "join (cudaStreamWaitEvent)");
  }
}

namespace {

// A recorded decode step (or any op sequence): the instantiated graph and the pool that holds its
// memory.
class CudaGraph final : public CapturedWork {
 public:
  CudaGraph(CudaBackend& be, cudaGraph_t g, cudaGraphExec_t e, std::shared_ptr<CapturePool> pool,
            bool has_checks)
      : be_(be), graph_(g), exec_(e), pool_(std::move(pool)), has_checks_(has_checks) {}
  ~CudaGraph() override {
    cudaGraphExecDestroy(exec_);
    cudaGraphDestroy(graph_);
  }
  void replay() override {
    check(cudaGraphLaunch(exec_, cuda::stream()), "graph replay (cudaGraphLaunch)");
    if (has_checks_) be_.note_checks_pending();
  }

 private:
  CudaBackend& be_;
  cudaGraph_t graph_;
  cudaGraphExec_t exec_;
  std::shared_ptr<CapturePool> pool_;
  bool has_checks_;
};

}  // namespace

std::unique_ptr<CapturedWork> CudaBackend::capture(const std::function<void()>& work) {
  if (const char* off = std::getenv("MOEKIT_CUDA_GRAPHS"); off && std::string(off) == "0")
    return nullptr;
  MOEKIT_CHECK(!capture_pool_, "CUDA capture: already recording");
  // Earlier errors belong to earlier work: report them before recording. Drained, the stream
  // holds no queued user of any cached block (upload_table relies on it).
  raise_index_errors();
  check(cudaStreamSynchronize(cuda::stream()), "capture (drain)");
  auto pool = std::make_shared<CapturePool>(alloc_);
  // Relaxed: the allocator may still call cudaMalloc while recording (not a stream operation).
  check(cudaStreamBeginCapture(cuda::stream(), cudaStreamCaptureModeRelaxed),
        "capture (cudaStreamBeginCapture)");
  capture_pool_ = pool;
  const bool pending_before = checks_pending_;
  checks_pending_ = false;
  cudaGraph_t graph = nullptr;
  try {
    work();
  } catch (...) {
    capture_pool_.reset();
    pool->recording = false;
    cudaStreamEndCapture(cuda::stream(), &graph);
    if (graph) cudaGraphDestroy(graph);
    cudaGetLastError();
    throw;
  }
  capture_pool_.reset();
  {
    std::lock_guard<std::mutex> lock(pool->mu);
    pool->recording = false;
  }
  const bool has_checks = checks_pending_;
  checks_pending_ = pending_before;
  check(cudaStreamEndCapture(cuda::stream(), &graph), "capture (cudaStreamEndCapture)");
  cudaGraphExec_t exec = nullptr;
  const cudaError_t e = cudaGraphInstantiate(&exec, graph, 0);
  if (e != cudaSuccess) {
    cudaGraphDestroy(graph);
    check(e, "capture (cudaGraphInstantiate)");
  }
  return std::make_unique<CudaGraph>(*this, graph, exec, std::move(pool), has_checks);
}

void CudaBackend::synchronize() {
  raise_index_errors();
  check(cudaDeviceSynchronize(), "synchronize");
}

void CudaBackend::memory_info(size_t& free_bytes, size_t& total_bytes) {
  raise_index_errors();
  check(cudaMemGetInfo(&free_bytes, &total_bytes), "memory_info (cudaMemGetInfo)");
  // Blocks cached by the allocator are free to moekit too.
  free_bytes += alloc_.cached_bytes();
}

// BF16: GEMM operands (weights; the experts' activations), the embedding table, MLA's kv_b weight
// in the decode step's fused ops, the bf16 activation variants of the MoE layer's dispatch,
// SwiGLU and combine, the bf16 outputs of RMSNorm and attention, and the loss's bf16 logits and
// gradient (ops.h gives each op's dtype rules). I32: gather_rows moves index tensors too.
bool CudaBackend::supports(Op op, DType dtype) const {
  if (dtype == DType::F32) return true;
  if (dtype == DType::I32) return op == Op::GatherRows;
  if (dtype != DType::BF16) return false;
  switch (op) {
    case Op::Matmul:
    case Op::GroupedMatmul:
    case Op::MoeExpertsSmall:
    case Op::Embedding:
    case Op::GatherRows:
    case Op::SwiGLU:
    case Op::ScatterAddRows:
    case Op::MlaAbsorbQuery:
    case Op::MlaValueHeads:
    case Op::RoundBf16:
    case Op::CrossEntropy:  // dlogits; the fused op's logits (the LM head's under Bf16)
    case Op::Attention:     // q, k, v and out (O in backward) under Bf16
    case Op::MlaSplitKv:    // kv_b, k, v, dkv_b
    case Op::MlaKvUp:       // k and v written by the GEMMs
    case Op::RmsNorm:       // out; the backward's dx_bf16 copy
    case Op::Rope:          // x and out
      return true;
    default:
      return false;
  }
}

// ---------------------------------------------------------------------------------------------
// Memory

size_t CudaAllocator::bucket(size_t bytes) {
  // 512-byte granularity up to 1 MiB, then 2 MiB: reuse without wasting much on large tensors.
  if (bytes <= (size_t(1) << 20)) return (bytes + 511) / 512 * 512;
  return (bytes + (size_t(2) << 20) - 1) / (size_t(2) << 20) * (size_t(2) << 20);
}

void* CudaAllocator::get(size_t bytes) {
  const size_t b = bucket(bytes);
  {
    std::lock_guard<std::mutex> lock(mu_);
    in_use_ += b;
    peak_ = std::max(peak_, in_use_);
    for (size_t& w : windows_) w = std::max(w, in_use_);
    auto it = free_.find(b);
    if (it != free_.end()) {
      void* p = it->second;
      free_.erase(it);
      return p;
    }
  }
  void* p = nullptr;
  if (cudaMalloc(&p, b) != cudaSuccess) {
    cudaGetLastError();
    release_cached();
    if (cudaMalloc(&p, b) != cudaSuccess) {
      cudaGetLastError();
      size_t free_bytes = 0, total = 0;
      cudaMemGetInfo(&free_bytes, &total);
      {
        std::lock_guard<std::mutex> lock(mu_);
        in_use_ -= b;
      }
      fail("CUDA allocate: out of GPU memory allocating {} bytes ({} of {} bytes free)", bytes,
           free_bytes, total);
    }
  }
  return p;
}

void CudaAllocator::put(void* p, size_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  in_use_ -= bucket(bytes);
  free_.emplace(bucket(bytes), p);
}

void CudaAllocator::open_window() {
  std::lock_guard<std::mutex> lock(mu_);
  windows_.push_back(in_use_);
}

size_t CudaAllocator::close_window() {
  std::lock_guard<std::mutex> lock(mu_);
  if (windows_.empty()) return 0;
  const size_t w = windows_.back();
  windows_.pop_back();
  return w;
}

size_t CudaAllocator::peak_bytes() {
  std::lock_guard<std::mutex> lock(mu_);
  return peak_;
}

size_t CudaAllocator::cached_bytes() {
  std::lock_guard<std::mutex> lock(mu_);
  size_t n = 0;
  for (const auto& [b, p] : free_) n += b;
  return n;
}

void CudaAllocator::release_cached() {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [b, p] : free_) cudaFree(p);
  free_.clear();
}

CapturePool::~CapturePool() {
  for (auto& [p, bytes] : owned) alloc.put(p, bytes);
}

void* CapturePool::get(size_t bytes) {
  const size_t b = CudaAllocator::bucket(bytes);
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = free.find(b);
    if (it != free.end()) {
      void* p = it->second;
      free.erase(it);
      return p;
    }
  }
  void* p = alloc.get(b);
  std::lock_guard<std::mutex> lock(mu);
  owned.emplace_back(p, b);
  return p;
}

void CapturePool::put(void* p, size_t bytes) {
  std::lock_guard<std::mutex> lock(mu);
  // After the recording, a freed block stays reserved (a replay still writes to it).
  if (recording) free.emplace(CudaAllocator::bucket(bytes), p);
}

std::shared_ptr<Storage> CudaBackend::allocate(size_t bytes) {
  if (capture_pool_) {
    std::shared_ptr<CapturePool> pool = capture_pool_;
    void* p = pool->get(bytes);
    return std::make_shared<Storage>(p, bytes, Device::CUDA,
                                     [pool, bytes](void* q) { pool->put(q, bytes); });
  }
  void* p = alloc_.get(bytes);
  return std::make_shared<Storage>(p, bytes, Device::CUDA,
                                   [this, bytes](void* q) { alloc_.put(q, bytes); });
}

Tensor CudaBackend::upload_table(const void* data, size_t bytes, const char* op) {
  std::shared_ptr<CapturePool> pool = std::exchange(capture_pool_, nullptr);
  Tensor t = scratch({int64_t((bytes + 3) / 4)}, DType::I32);
  capture_pool_ = pool;
  if (!pool) {
    // From pageable memory the copy is staged at once (as grouped_matmul's pointer upload).
    check(cudaMemcpyAsync(t.raw(), data, bytes, cudaMemcpyHostToDevice, cuda::stream()), op);
    return t;
  }
  // Recording: a host-memory copy cannot be part of the graph (the table is read at every replay,
  // its upload belongs to no step), so it goes on a stream of its own, waited for here. capture()
  // drained the recorded stream first, so no queued kernel still uses the block.
  static const cudaStream_t upload = [] {
    cudaStream_t st = nullptr;
    check(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), "upload stream");
    return st;
  }();
  check(cudaMemcpyAsync(t.raw(), data, bytes, cudaMemcpyHostToDevice, upload), op);
  check(cudaStreamSynchronize(upload), op);
  return t;
}

Tensor CudaBackend::scratch(Shape shape, DType dtype) {
  return Tensor::empty(shape, dtype, Device::CUDA);
}

Tensor CudaBackend::as_bf16(const Tensor& t) {
  if (t.dtype() == DType::BF16) return t;
  cuda::expect_f32(t, "as_bf16", "input");
  Tensor out = scratch(t.shape(), DType::BF16);
  round_bf16(out, t);  // the op layers call to round an input once for several GEMMs
  return out;
}

void CudaBackend::copy(Tensor& dst, const Tensor& src) {
  MOEKIT_CHECK(dst.nbytes() == src.nbytes(), "copy: {} vs {} bytes", dst.nbytes(), src.nbytes());
  if (dst.nbytes() == 0) return;
  // Unified addressing: the driver tells host from device pointers (either side may be host).
  // In stream order; a copy that touches the host waits for it (the caller reads or reuses it).
  check(cudaMemcpyAsync(dst.raw(), src.raw(), dst.nbytes(), cudaMemcpyDefault, cuda::stream()),
        "copy");
  // A copy to the host waits for every queued kernel: the point to report bad indices. The error
  // slot rides along in the same wait (an MoE layer's plan copy is on every forward's critical
  // path: a second synchronising copy cost it ~15 us).
  const bool to_host = dst.device() != Device::CUDA;
  uint64_t epoch = 0;
  const bool staged = to_host && stage_index_errors(epoch, "copy (index check)");
  if (to_host || src.device() != Device::CUDA) check(cudaStreamSynchronize(cuda::stream()), "copy");
  if (to_host) raise_index_errors(staged);
}

// copy_to_host_async's handle: waits on the event recorded after the copy, then hands out the
// staged bytes and reports index errors (from the slot staged with the copy while no check was
// queued since, else by a synchronous read).
class CudaPendingHostCopy final : public PendingHostCopy {
 public:
  // src is held until the copy is waited for: it is read on the copy's own stream, which the
  // compute stream's allocator does not order a reuse of its memory after.
  CudaPendingHostCopy(CudaBackend& be, Tensor src, Tensor host, bool staged, uint64_t epoch)
      : be_(be), src_(std::move(src)), host_(std::move(host)), staged_(staged), epoch_(epoch) {}
  ~CudaPendingHostCopy() override {
    if (be_.host_copy_pending_) cudaEventSynchronize(static_cast<cudaEvent_t>(be_.host_copy_done_));
    be_.host_copy_pending_ = false;
  }
  Tensor wait() override {
    MOEKIT_CHECK(be_.host_copy_pending_, "copy_to_host_async: waited for twice");
    check(cudaEventSynchronize(static_cast<cudaEvent_t>(be_.host_copy_done_)),
          "copy_to_host_async (cudaEventSynchronize)");
    be_.host_copy_pending_ = false;
    src_ = Tensor();
    std::memcpy(host_.raw(), be_.host_staging_, host_.nbytes());
    bool current = false;
    {
      std::lock_guard<std::mutex> lock(be_.checks_mu_);
      current = staged_ && be_.check_epoch_ == epoch_;
    }
    be_.raise_index_errors(current);
    return host_;
  }

 private:
  CudaBackend& be_;
  Tensor src_, host_;
  bool staged_;
  uint64_t epoch_;
};

std::unique_ptr<PendingHostCopy> CudaBackend::copy_to_host_async(const Tensor& src) {
  if (src.device() != Device::CUDA) return Backend::copy_to_host_async(src);
  MOEKIT_CHECK(!host_copy_pending_, "copy_to_host_async: a copy is already in flight");
  MOEKIT_CHECK(!capture_pool_, "copy_to_host_async: not while recording a graph");
  const size_t bytes = src.nbytes();
  if (bytes > host_staging_bytes_) {
    if (host_staging_) check(cudaFreeHost(host_staging_), "copy_to_host_async (cudaFreeHost)");
    host_staging_ = nullptr;
    host_staging_bytes_ = 0;
    check(cudaMallocHost(&host_staging_, std::max<size_t>(bytes, 4096)),
          "copy_to_host_async (cudaMallocHost)");
    host_staging_bytes_ = std::max<size_t>(bytes, 4096);
  }
  if (!host_copy_done_) {
    cudaEvent_t done = nullptr, ready = nullptr;
    cudaStream_t st = nullptr;
    check(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), "copy_to_host_async (event)");
    check(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming), "copy_to_host_async (event)");
    check(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), "copy_to_host_async (stream)");
    host_copy_done_ = done;
    copy_ready_ = ready;
    copy_stream_ = st;
  }
  // The copy (and the error slot's) runs on a stream of its own once the compute stream reaches
  // this point: queued on the compute stream, the switch from its kernels to the copy engine and
  // back cost ~6 us on each side, ~17 us per MoE layer of a V2-Lite prefill (the dispatch plan's
  // sizes), while the kernels queued after it (the shared experts) need nothing from it.
  const auto st = static_cast<cudaStream_t>(copy_stream_);
  check(cudaEventRecord(static_cast<cudaEvent_t>(copy_ready_), cuda::stream()),
        "copy_to_host_async (cudaEventRecord)");
  check(cudaStreamWaitEvent(st, static_cast<cudaEvent_t>(copy_ready_), 0),
        "copy_to_host_async (cudaStreamWaitEvent)");
  if (bytes > 0)
    check(cudaMemcpyAsync(host_staging_, src.raw(), bytes, cudaMemcpyDeviceToHost, st),
          "copy_to_host_async");
  uint64_t epoch = 0;
  const bool staged = stage_index_errors(epoch, "copy_to_host_async (index check)", st);
  check(cudaEventRecord(static_cast<cudaEvent_t>(host_copy_done_), st),
        "copy_to_host_async (cudaEventRecord)");
  host_copy_pending_ = true;
  return std::make_unique<CudaPendingHostCopy>(*this, src, Tensor::empty(src.shape(), src.dtype()),
                                               staged, epoch);
}

void CudaBackend::fill(Tensor& t, float value) {
  if (t.defined() && t.device() != Device::CUDA) fail("CUDA fill: tensor is in host memory");
  if (t.numel() == 0) return;
  if (value == 0.0f && !std::signbit(value)) {
    check(cudaMemsetAsync(t.raw(), 0, t.nbytes(), cuda::stream()), "fill");
    return;
  }
  uint32_t bits = 0;
  switch (t.dtype()) {
    case DType::F32:
      bits = std::bit_cast<uint32_t>(value);
      break;
    case DType::I32:
      bits = uint32_t(int32_t(value));
      break;
    case DType::BF16:
      bits = f32_to_bf16(value);
      break;
    case DType::F16:
      bits = f32_to_f16(value);
      break;
  }
  check(cuda::fill_bits(t.raw(), t.numel(), int(dtype_size(t.dtype())), bits), "fill");
}

// ---------------------------------------------------------------------------------------------
// GEMM

namespace {

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::F32:
      return CUDA_R_32F;
    case DType::BF16:
      return CUDA_R_16BF;
    case DType::F16:
      return CUDA_R_16F;
    case DType::I32:
      break;
  }
  fail("CUDA matmul: unsupported dtype {}", dtype_name(t));
}

// Row-major c[M,N] = alpha op(a) op(b) + beta c through cublasGemmEx, operands already in the
// dtypes they run in. cuBLAS is column-major: a row-major X[r, c] is a column-major X^T with
// leading dim c, so row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the
// operands.
void gemm_row_major(void* handle, Tensor& c, const Tensor& a, const Tensor& b, bool trans_a,
                    bool trans_b, float alpha, float beta, int64_t M, int64_t N, int64_t K,
                    cublasComputeType_t compute) {
  const auto ta = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const auto tb = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  check_cublas(cublas().gemm_ex(static_cast<cublasHandle_t>(handle), tb, ta, int(N), int(M), int(K),
                                &alpha, b.raw(), cuda_type(b.dtype()), int(cols(b)), a.raw(),
                                cuda_type(a.dtype()), int(cols(a)), &beta, c.raw(),
                                cuda_type(c.dtype()), int(N), compute, CUBLAS_GEMM_DEFAULT),
               "matmul (cublasGemmEx)");
}

// One group of grouped_gemm, row-major: c [rows, n] = a [rows, k] @ op(w), leading dimensions in
// elements. Pointers into device memory, all of grouped_gemm's `type`.
struct GroupGemm {
  const void* w = nullptr;
  const void* a = nullptr;
  void* c = nullptr;
  int64_t ldw = 0, lda = 0, ldc = 0, rows = 0, n = 0, k = 0;
};

// Group g of a grouped_matmul term: rows [begin[g], begin[g+1]) of a and c against the weight w.
GroupGemm group_gemm(const Tensor& c, const Tensor& a, const Tensor& w,
                     std::span<const int64_t> begin, size_t g) {
  return {.w = w.raw(),
          .a = a.slice(begin[g], begin[g + 1]).raw(),
          .c = c.slice(begin[g], begin[g + 1]).raw(),
          .ldw = cols(w),
          .lda = cols(a),
          .ldc = cols(c),
          .rows = begin[g + 1] - begin[g],
          .n = cols(c),
          .k = cols(a)};
}

// The matrix pointers of cuBLAS's batched and grouped GEMMs, which must be in device memory: one
// asynchronous upload (from pageable memory the copy is staged at once, so `ptrs` may go when this
// returns). Dropping the returned tensor once the GEMMs are queued is safe: all work is on one
// stream, so a later user of the block runs after them.
Tensor upload_bytes(const void* data, size_t bytes, const char* op) {
  Tensor t = Tensor::empty({int64_t((bytes + 3) / 4)}, DType::I32, Device::CUDA);
  check(cudaMemcpyAsync(t.raw(), data, bytes, cudaMemcpyHostToDevice, cuda::stream()), op);
  return t;
}
// A few pointers (matmul_pair's six) as a small kernel's argument instead (write_small_table: no
// wait for the stream).
Tensor upload_pointers(std::span<const void* const> ptrs, const char* op) {
  if (ptrs.size() > size_t(cuda::kSmallTableWords))
    return upload_bytes(ptrs.data(), ptrs.size_bytes(), op);
  Tensor t = Tensor::empty({int64_t(2 * ptrs.size())}, DType::I32, Device::CUDA);
  uint64_t words[cuda::kSmallTableWords];
  for (size_t i = 0; i < ptrs.size(); ++i) words[i] = reinterpret_cast<uintptr_t>(ptrs[i]);
  check(cuda::write_small_table(static_cast<uint64_t*>(t.raw()), words, int(ptrs.size())), op);
  return t;
}

// One cublasGemmBatchedEx of `count` GEMMs of one shape, in cuBLAS's column-major terms:
// C_i [m, n] = op(A_i) op(B_i) + beta C_i, A_i and B_i bf16, fp32 accumulation. Its pointers
// [A_0.., B_0.., C_0..] start at `first` of the list that run_batched_gemms uploads.
struct BatchedGemm {
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0, lda = 0, ldb = 0, ldc = 0, count = 0;
  size_t first = 0;
  float beta = 0.0f;
};

// The padded expert blocks' batched GEMMs (grouped_matmul_batched, grouped_weight_grad): every
// call's pointers in one upload, then the calls in order; C of `c_type`.
void run_batched_gemms(void* handle, std::span<const BatchedGemm> calls,
                       std::span<const void* const> ptrs, cudaDataType c_type, const char* op) {
  constexpr int64_t kInt = 2147483647;
  for (const BatchedGemm& q : calls)
    MOEKIT_CHECK(q.m <= kInt && q.n <= kInt && q.k <= kInt && q.lda <= kInt && q.ldb <= kInt &&
                     q.ldc <= kInt && q.count <= kInt,
                 "{}: a batched GEMM of {} x {} x {} exceeds cuBLAS's int", op, q.m, q.n, q.k);
  const Tensor dptrs = upload_pointers(ptrs, (std::string(op) + " (pointer upload)").c_str());
  const auto* dev = static_cast<const void* const*>(dptrs.raw());
  const float one = 1.0f;
  for (const BatchedGemm& q : calls) {
    const void* const* p = dev + q.first;
    const cublasStatus_t status = cublas().gemm_batched_ex(
        static_cast<cublasHandle_t>(handle), q.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
        q.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, int(q.m), int(q.n), int(q.k), &one, p, CUDA_R_16BF,
        int(q.lda), p + q.count, CUDA_R_16BF, int(q.ldb), &q.beta,
        const_cast<void* const*>(p + 2 * q.count), c_type, int(q.ldc), int(q.count),
        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (status != CUBLAS_STATUS_SUCCESS)
      check_cublas(status, (std::string(op) + " (cublasGemmBatchedEx)").c_str());
  }
}

// One cublasGemmGroupedBatchedEx over `groups` (each its own sizes and pointers), column-major as
// in gemm_row_major: C_g^T [n, rows] = op(W_g)^T [n, k] a_g^T [k, rows]. W, a and c all of `type`.
// The per-group scalars and sizes are host arrays; the matrix pointers go up in one upload.
void grouped_gemm(void* handle, std::span<const GroupGemm> groups, bool trans_b, float beta,
                  cudaDataType type, cublasComputeType_t compute) {
  const size_t G = groups.size();
  constexpr int64_t kInt = 2147483647;
  std::vector<cublasOperation_t> trans_w(G, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N);
  std::vector<cublasOperation_t> trans_a(G, CUBLAS_OP_N);
  std::vector<int> m(G), n(G), k(G), ldw(G), lda(G), ldc(G);
  std::vector<int> group_size(G, 1);
  std::vector<float> alphas(G, 1.0f), betas(G, beta);
  std::vector<const void*> ptrs(3 * G);  // [W_g..., a_g..., c_g...]
  for (size_t i = 0; i < G; ++i) {
    const GroupGemm& q = groups[i];
    MOEKIT_CHECK(q.rows <= kInt && q.n <= kInt && q.k <= kInt && q.ldw <= kInt && q.lda <= kInt &&
                     q.ldc <= kInt,
                 "grouped_matmul: a group of {} x {} x {} exceeds cuBLAS's int", q.rows, q.n, q.k);
    m[i] = int(q.n);
    n[i] = int(q.rows);
    k[i] = int(q.k);
    ldw[i] = int(q.ldw);
    lda[i] = int(q.lda);
    ldc[i] = int(q.ldc);
    ptrs[i] = q.w;
    ptrs[G + i] = q.a;
    ptrs[2 * G + i] = q.c;
  }
  const Tensor dptrs = upload_pointers(ptrs, "grouped_matmul (pointer upload)");
  const auto* dev_ptrs = static_cast<const void* const*>(dptrs.raw());
  check_cublas(cublas().gemm_grouped(static_cast<cublasHandle_t>(handle), trans_w.data(),
                                     trans_a.data(), m.data(), n.data(), k.data(), alphas.data(),
                                     dev_ptrs, type, ldw.data(), dev_ptrs + G, type, lda.data(),
                                     betas.data(), const_cast<void* const*>(dev_ptrs + 2 * G), type,
                                     ldc.data(), int(G), group_size.data(), compute),
               "grouped_matmul (cublasGemmGroupedBatchedEx)");
}

void expect_gemm_operand(const Tensor& t, const char* op, const char* name) {
  if (t.dtype() != DType::F32 && t.dtype() != DType::BF16)
    fail("CUDA {}: {} is {} (supported: F32, BF16)", op, name, dtype_name(t.dtype()));
  cuda::expect(t, t.dtype(), op, name);
}

}  // namespace

void CudaBackend::matmul(Tensor& c, const Tensor& a_in, const Tensor& b_in, bool trans_a,
                         bool trans_b, float alpha, float beta) {
  const auto [M, N, K] = matmul_dims(c, a_in, b_in, trans_a, trans_b);
  expect_gemm_operand(a_in, "matmul", "a");
  expect_gemm_operand(b_in, "matmul", "b");
  expect_gemm_operand(c, "matmul", "c");
  if (M == 0 || N == 0) return;
  if (K == 0) {  // as the CPU backend: c = beta * c
    if (beta == 0.0f)
      fill(c, 0.0f);
    else if (c.dtype() == DType::F32)
      scale(c, beta);
    else
      fail("CUDA matmul: K = 0 with beta != 0 needs an F32 output");
    return;
  }
  // Few rows against a weight matrix (decoding): a GEMV kernel of ours reads the weight once as
  // stored (bf16 bits widened exactly, or fp32: not rounded even under the Bf16 precision), with
  // no conversion of the activations. Only where bf16 is in play (a BF16 weight or the Bf16
  // precision): the exact fp32 mode keeps cuBLAS, which the parity tests check.
  const bool few_rows = !trans_a && trans_b && M <= cuda::kGemvMaxRows &&
                        a_in.dtype() == DType::F32 && c.dtype() == DType::F32;
  if (few_rows && (b_in.dtype() == DType::BF16 || precision_ == Precision::Bf16)) {
    check(cuda::gemv(c.f32(), a_in.f32(), b_in.raw(), b_in.dtype() == DType::BF16, M, N, K,
                     cols(a_in), cols(b_in), N, alpha, beta),
          "matmul (gemv)");
    return;
  }
  // A BF16 operand (bf16 weights) or the Bf16 precision puts the GEMM on the bf16 tensor cores:
  // F32 operands are rounded to bf16 first (cuBLAS's COMPUTE_32F_FAST_16BF was measured to run
  // TF32 kernels on the H200, at half the bf16 rate). Accumulation stays fp32.
  const bool bf16 =
      a_in.dtype() == DType::BF16 || b_in.dtype() == DType::BF16 || precision_ == Precision::Bf16;
  const Tensor a = bf16 ? as_bf16(a_in) : a_in, b = bf16 ? as_bf16(b_in) : b_in;
  const cublasComputeType_t compute =
      !bf16 && precision_ == Precision::Tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  gemm_row_major(cublas_, c, a, b, trans_a, trans_b, alpha, beta, M, N, K, compute);
}

void CudaBackend::grouped_matmul(Tensor& c, const Tensor& a, std::span<const Tensor* const> b,
                                 std::span<const int64_t> begin, bool trans_b, float beta) {
  const GroupedTerm term{&a, b};
  grouped_matmul_terms(c, std::span<const GroupedTerm>(&term, 1), begin, trans_b, beta);
}

void CudaBackend::grouped_matmul_sum(Tensor& c, std::span<const GroupedTerm> terms,
                                     std::span<const int64_t> begin, bool trans_b, float beta) {
  MOEKIT_CHECK(!terms.empty(), "grouped_matmul_sum: no terms");
  if (terms.size() > 1) cuda::expect_f32(c, "grouped_matmul_sum", "c");
  grouped_matmul_terms(c, terms, begin, trans_b, beta);
}

CudaBackend::GroupedRoute CudaBackend::grouped_route(const Tensor& c,
                                                     std::span<const GroupedTerm> terms,
                                                     std::span<const int64_t> begin, bool trans_b,
                                                     float beta) {
  const char* op = "grouped_matmul";
  expect_gemm_operand(c, op, "c");
  GroupedRoute r;
  // A BF16 operand anywhere or the Bf16 precision puts every group on the bf16 tensor cores.
  r.bf16 = precision_ == Precision::Bf16 || c.dtype() == DType::BF16;
  for (size_t t = 0; t < terms.size(); ++t) {
    MOEKIT_CHECK(terms[t].a, "grouped_matmul: term {} has no rows", t);
    const Tensor& a = *terms[t].a;
    r.k_zero = grouped_matmul_dims(c, a, terms[t].b, begin, trans_b).K == 0 || r.k_zero;
    expect_gemm_operand(a, op, "a");
    r.bf16 = r.bf16 || a.dtype() == DType::BF16;
    for (size_t g = 0; g + 1 < begin.size(); ++g) {
      if (begin[g] == begin[g + 1]) continue;
      expect_gemm_operand(*terms[t].b[g], op, "b");
      r.bf16 = r.bf16 || terms[t].b[g]->dtype() == DType::BF16;
    }
  }
  if (c.dtype() == DType::BF16 && beta != 0.0f)
    fail(
        "CUDA grouped_matmul: a BF16 c takes beta = 0 (the products are written to it, not "
        "added), got beta {}",
        beta);
  for (size_t g = 0; g + 1 < begin.size(); ++g)
    if (begin[g] != begin[g + 1]) r.groups.push_back(g);
  r.padded = r.bf16 && !r.k_zero && padded_expert_gemms() && !r.groups.empty() && cols(c) > 0;
  for (size_t g : r.groups) r.padded = r.padded && (begin[g + 1] - begin[g]) % kBatchedRows == 0;
  return r;
}

void CudaBackend::grouped_matmul_terms(Tensor& c, std::span<const GroupedTerm> terms,
                                       std::span<const int64_t> begin, bool trans_b, float beta) {
  const auto [bf16, k_zero, groups, padded] = grouped_route(c, terms, begin, trans_b, beta);
  if (groups.empty() || cols(c) == 0) return;
  if (padded && terms.size() == 1 && trans_b && beta == 0.0f &&
      own_expert_gemm(c, nullptr, nullptr, *terms[0].a, terms[0].b, {}, begin))
    return;
  if (padded) {  // the terms of the sum one after another, each adding to c after the first
    std::vector<BatchedProduct> products;
    for (size_t t = 0; t < terms.size(); ++t)
      products.push_back({&c, terms[t].a, terms[t].b, t == 0 ? beta : 1.0f});
    return grouped_matmul_batched(products, groups, begin, trans_b);
  }
  const bool one_launch =
      bf16 && !k_zero && expert_gemm_ != ExpertGemm::Streams && cublas().gemm_grouped;
  if (one_launch) return grouped_matmul_bf16(c, terms, groups, begin, trans_b, beta);
  if (terms.size() > 1) {  // term by term, as Backend::grouped_matmul_sum
    for (size_t t = 0; t < terms.size(); ++t)
      grouped_matmul_terms(c, terms.subspan(t, 1), begin, trans_b, t == 0 ? beta : 1.0f);
    return;
  }
  const Tensor& a_in = *terms[0].a;
  const std::span<const Tensor* const> b = terms[0].b;
  const int64_t N = cols(c), K = cols(a_in);
  auto rows_of = [&](const Tensor& t, size_t g) { return t.slice(begin[g], begin[g + 1]); };
  if (K == 0) {  // c_g = beta c_g, as matmul
    for (size_t g : groups) {
      Tensor cg = rows_of(c, g);
      matmul(cg, rows_of(a_in, g), *b[g], false, trans_b, 1.0f, beta);
    }
    return;
  }
  if (bf16) {
    // MOEKIT_CUDA_EXPERT_GEMM=streams (or no grouped GEMM in this cuBLAS): one expert's GEMM is
    // small (a few hundred rows: its output tiles fill about half of an H200's SMs), so the
    // experts run on side streams at once, in waves of kSideStreams: each wave forks from the
    // default stream after its F32 weights are rounded, and joins back into it before they are
    // freed, so outside this function all work stays in one stream's order (which the caching
    // allocator relies on). Waves bound the rounded copies alive at once. The activation block
    // is rounded once (BF16 already: used as it is); the output is written in c's dtype.
    const Tensor a = as_bf16(a_in);
    for (size_t w0 = 0; w0 < groups.size(); w0 += kSideStreams) {
      const size_t w1 = std::min(groups.size(), w0 + kSideStreams);
      std::vector<Tensor> weights;
      for (size_t i = w0; i < w1; ++i) weights.push_back(as_bf16(*b[groups[i]]));
      fork_side_streams(w1 - w0);
      for (size_t i = w0; i < w1; ++i) {
        const size_t g = groups[i];
        Tensor cg = rows_of(c, g);
        gemm_row_major(side_cublas_[i - w0], cg, rows_of(a, g), weights[i - w0], false, trans_b,
                       1.0f, beta, begin[g + 1] - begin[g], N, K, CUBLAS_COMPUTE_32F);
      }
      join_side_streams(w1 - w0);
    }
    return;
  }
  const bool tf32 = precision_ == Precision::Tf32;
  const cublasComputeType_t compute = tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  // The grouped API's alignment rule for the FAST compute types (cuBLAS docs): a matrix whose
  // leading dimension is a multiple of 16 bytes needs a 16-byte aligned pointer. Row blocks of
  // whole tensors meet it; a view at an odd offset takes the loop below instead.
  auto aligned = [](const void* p, int64_t ld) {
    return (ld * 4) % 16 != 0 || reinterpret_cast<uintptr_t>(p) % 16 == 0;
  };
  bool grouped = cublas().gemm_grouped != nullptr;
  for (size_t g : groups)
    if (tf32 && !(aligned(b[g]->raw(), cols(*b[g])) && aligned(rows_of(a_in, g).raw(), K) &&
                  aligned(rows_of(c, g).raw(), N)))
      grouped = false;
  if (!grouped) {
    for (size_t g : groups) {
      Tensor cg = rows_of(c, g);
      gemm_row_major(cublas_, cg, rows_of(a_in, g), *b[g], false, trans_b, 1.0f, beta,
                     begin[g + 1] - begin[g], N, K, compute);
    }
    return;
  }
  std::vector<GroupGemm> gs;
  for (size_t g : groups) gs.push_back(group_gemm(c, a_in, *b[g], begin, g));
  grouped_gemm(cublas_, gs, trans_b, beta, CUDA_R_32F, compute);
}

void CudaBackend::matmul_pair(Tensor& y0, Tensor& y1, const Tensor& x, const Tensor& w0,
                              const Tensor& w1) {
  const bool same = y0.shape() == y1.shape() && y0.dtype() == y1.dtype() &&
                    w0.shape() == w1.shape() && w0.dtype() == w1.dtype();
  // One cublasGemmBatchedEx of the two products where matmul would run them on cuBLAS's bf16 path
  // (not the GEMV of few rows, not fp32 or TF32) on widths of whole 16-byte rows (every model's);
  // else the default.
  const bool bf16 =
      x.dtype() == DType::BF16 || w0.dtype() == DType::BF16 || precision_ == Precision::Bf16;
  if (!same || !bf16 || x.ndim() != 2 || y0.ndim() != 2 || rows(x) <= cuda::kGemvMaxRows ||
      cols(x) == 0 || cols(x) % 8 != 0 || cols(y0) % 8 != 0)
    return Backend::matmul_pair(y0, y1, x, w0, w1);
  const auto [M, N, K] = matmul_dims(y0, x, w0, false, true);
  expect_gemm_operand(x, "matmul_pair", "x");
  for (const Tensor* t : {&w0, &w1}) expect_gemm_operand(*t, "matmul_pair", "w");
  for (const Tensor* t : {&y0, &y1}) expect_gemm_operand(*t, "matmul_pair", "y");
  if (M == 0 || N == 0) return;
  const Tensor a = as_bf16(x), b0 = as_bf16(w0), b1 = as_bf16(w1);
  // Column-major as gemm_row_major: y_i^T [N, M] = W_i x^T.
  const BatchedGemm call{.trans_a = true,
                         .m = N,
                         .n = M,
                         .k = K,
                         .lda = K,
                         .ldb = K,
                         .ldc = N,
                         .count = 2,
                         .first = 0,
                         .beta = 0.0f};
  const void* const ptrs[] = {b0.raw(), b1.raw(), a.raw(), a.raw(), y0.raw(), y1.raw()};
  run_batched_gemms(cublas_, {&call, 1}, ptrs, cuda_type(y0.dtype()), "matmul_pair");
}

void CudaBackend::grouped_swiglu(Tensor& h, Tensor* gate, Tensor* up, const Tensor& x,
                                 std::span<const Tensor* const> gate_w,
                                 std::span<const Tensor* const> up_w,
                                 std::span<const int64_t> begin) {
  // The fused kernel only under MOEKIT_CUDA_EXPERT_GEMM=own (own_expert_gemm checks the rest:
  // padding, dtypes, sizes); its arguments checked first as grouped_matmul checks them, since it
  // writes h, gate and up directly. Otherwise the base class's sequence, which checks its own.
  if (expert_gemm_ == ExpertGemm::Own && gate_w.size() == up_w.size()) {
    grouped_matmul_dims(h, x, gate_w, begin, true);
    grouped_matmul_dims(h, x, up_w, begin, true);
    expect_gemm_operand(x, "grouped_swiglu", "x");
    const bool same = (!gate || (gate->shape() == h.shape() && gate->dtype() == h.dtype())) &&
                      (!up || (up->shape() == h.shape() && up->dtype() == h.dtype()));
    if (same && own_expert_gemm(h, gate, up, x, gate_w, up_w, begin)) return;
  }
  // On padded expert blocks (the default path) the gate and up products share the batched calls:
  // half the launches, and twice the tiles per launch fill the last wave better.
  if (gate_w.size() == up_w.size() && expert_gemm_ == ExpertGemm::Batched) {
    for (const Tensor* t : {gate, up})
      MOEKIT_CHECK(!t || (t->shape() == h.shape() && t->dtype() == h.dtype()),
                   "grouped_swiglu: a product {} ({}) for h {} ({})", t->shape().str(),
                   dtype_name(t->dtype()), h.shape().str(), dtype_name(h.dtype()));
    // The products have h's shape and dtype, so h answers for them in the route; the temporaries
    // are made only where the batched calls will write them.
    const GroupedTerm gate_term{&x, gate_w}, up_term{&x, up_w};
    const GroupedRoute route = grouped_route(h, {&gate_term, 1}, begin, true, 0.0f);
    if (route.padded && grouped_route(h, {&up_term, 1}, begin, true, 0.0f).padded) {
      Tensor g = gate ? *gate : Tensor::empty(h.shape(), h.dtype(), h.device());
      Tensor u = up ? *up : Tensor::empty(h.shape(), h.dtype(), h.device());
      const BatchedProduct products[] = {{&g, &x, gate_w, 0.0f}, {&u, &x, up_w, 0.0f}};
      grouped_matmul_batched(products, route.groups, begin, true);
      swiglu_forward(h, g, u);
      return;
    }
  }
  Backend::grouped_swiglu(h, gate, up, x, gate_w, up_w, begin);
}

bool CudaBackend::own_expert_gemm(Tensor& c, Tensor* gate, Tensor* up, const Tensor& a_in,
                                  std::span<const Tensor* const> w0,
                                  std::span<const Tensor* const> w1,
                                  std::span<const int64_t> begin) {
  const bool swiglu = !w1.empty();
  if (expert_gemm_ != ExpertGemm::Own || c.dtype() != DType::BF16) return false;
  for (const Tensor* t : {gate, up})
    if (t && t->dtype() != DType::BF16) return false;
  const int64_t R = rows(c), N = cols(c), K = cols(a_in);
  if (R == 0 || N == 0 || K == 0 || K % 8 != 0 || N % 2 != 0 || R % kBatchedRows != 0 ||
      begin.front() != 0 || begin.back() != R)
    return false;
  // The expert of each 128-row block (every non-empty group a whole number of blocks).
  std::vector<int32_t> block_expert(size_t(R / kBatchedRows), -1);
  for (size_t g = 0; g + 1 < begin.size(); ++g) {
    if ((begin[g + 1] - begin[g]) % kBatchedRows != 0) return false;
    for (int64_t r = begin[g]; r < begin[g + 1]; r += kBatchedRows)
      block_expert[size_t(r / kBatchedRows)] = int32_t(g);
  }
  // Operands in bf16 (alive until the kernel is queued: the allocator orders reuse by stream).
  const Tensor a = as_bf16(a_in);
  std::vector<Tensor> keep;
  std::vector<int64_t> key;  // what the weight maps encode
  const size_t E = w0.size();
  for (size_t g = 0; g < E; ++g) {
    for (std::span<const Tensor* const> w : {w0, swiglu ? w1 : w0}) {
      if (begin[g] == begin[g + 1]) {  // no rows: the map is never read
        key.insert(key.end(), {0, 0, 0});
        keep.emplace_back();
        continue;
      }
      keep.push_back(as_bf16(*w[g]));
      const Tensor& t = keep.back();
      key.insert(key.end(), {int64_t(reinterpret_cast<uintptr_t>(t.raw())), rows(t), cols(t)});
    }
  }
  auto found = weight_maps_.find(key);
  if (found == weight_maps_.end()) {
    std::vector<cuda::TensorMap> maps(2 * E);
    for (size_t i = 0; i < 2 * E; ++i) {
      if (!keep[i].defined()) continue;
      if (cuda::expert_gemm_tensor_map(&maps[i], keep[i].raw(), rows(keep[i]), cols(keep[i]),
                                       cols(keep[i])) != cudaSuccess)
        return false;
    }
    if (weight_maps_.size() >= kMaxWeightMaps) weight_maps_.clear();
    Tensor table = upload_bytes(maps.data(), maps.size() * sizeof(cuda::TensorMap),
                                "expert GEMM (tensor map upload)");
    found = weight_maps_.emplace(std::move(key), std::move(table)).first;
  }
  cuda::ExpertGemmArgs args;
  if (cuda::expert_gemm_tensor_map(&args.a_map, a.raw(), R, K, K) != cudaSuccess) return false;
  const Tensor blocks =
      upload_bytes(block_expert.data(), block_expert.size() * 4, "expert GEMM (block upload)");
  args.w_maps = static_cast<const cuda::TensorMap*>(found->second.raw());
  args.block_expert = static_cast<const int32_t*>(blocks.raw());
  args.rows = R;
  args.n = N;
  args.k = K;
  args.out = c.raw();
  args.ld_out = N;
  args.gate = gate ? gate->raw() : nullptr;
  args.up = up ? up->raw() : nullptr;
  args.swiglu = swiglu;
  check(cuda::expert_gemm(args),
        swiglu ? "grouped_swiglu (expert GEMM)" : "grouped_matmul (expert GEMM)");
  return true;
}

void CudaBackend::grouped_matmul_bf16(Tensor& c, std::span<const GroupedTerm> terms,
                                      const std::vector<size_t>& groups,
                                      std::span<const int64_t> begin, bool trans_b, float beta) {
  // One launch for every expert of every term: cuBLAS's grouped GEMM schedules all groups' tiles
  // at once, but takes bf16 inputs only with a bf16 output. A BF16 c (one term, beta 0) receives
  // the products directly; an F32 c gets them through a bf16 scratch [terms, R, N] (rounded to
  // bf16 as a bf16 model's activations are) and one pass c = beta c + sum of the terms in fp32,
  // in term order (so two terms cost one pass over c, not two). BF16 activations are used as they
  // are, F32 ones rounded once; the F32 weights (trainable experts) are rounded first, all at once.
  const int64_t R = rows(c), T = int64_t(terms.size());
  const bool direct = c.dtype() == DType::BF16;
  MOEKIT_CHECK(!direct || T == 1, "grouped_matmul_bf16: {} terms into a BF16 c", T);
  Tensor out = direct ? c : scratch({T * R, cols(c)}, DType::BF16);
  std::vector<Tensor> keep;  // the bf16 operands, alive until the GEMM is queued
  std::vector<GroupGemm> gs;
  for (int64_t t = 0; t < T; ++t) {
    const GroupedTerm& term = terms[size_t(t)];
    const Tensor a = as_bf16(*term.a), ct = out.slice(t * R, (t + 1) * R);
    keep.push_back(a);
    for (size_t g : groups) {
      keep.push_back(as_bf16(*term.b[g]));
      gs.push_back(group_gemm(ct, a, keep.back(), begin, g));
    }
  }
  grouped_gemm(cublas_, gs, trans_b, 0.0f, CUDA_R_16BF, CUBLAS_COMPUTE_32F);
  if (!direct)
    check(cuda::add_bf16(c.f32(), out.raw(), c.numel(), T, beta), "grouped_matmul (bf16 -> f32)");
}

// Why padded expert blocks: cuBLAS's grouped GEMM runs warp-level (sm80) kernels, ~310 TFLOP/s on
// V2-Lite's expert GEMMs (8192 tokens, 64 experts, top-6) on the H200, while its batched GEMM
// runs Hopper's warpgroup kernels: ~780-800 TFLOP/s of useful work on the same GEMMs with each
// expert padded to a multiple of 128 rows (9 % padding), near the 870 of one dense GEMM of all
// rows (tools/expert_gemm_bench.cu). By default every 128-row block of every expert is one
// problem of a single batched call (ExpertBatch::Blocks; an expert's blocks adjacent in the
// batch), rather than one call per distinct padded size: a skewed routing spreads the experts over
// 10-15 sizes, each call then ending in a partial wave.
// The padding rows are zeros (the plan's padding slots), so they add nothing to any product. A BF16
// c (one term, beta 0) receives the rounded products; an F32 c the fp32 sums, each term added with
// beta 1 after the first (no bf16 scratch).
void CudaBackend::grouped_matmul_batched(std::span<const BatchedProduct> products,
                                         const std::vector<size_t>& groups,
                                         std::span<const int64_t> begin, bool trans_b) {
  const int64_t N = cols(*products[0].c), K = cols(*products[0].a);
  // rows -> the (group, first row) pieces of that many rows, each one problem of a batched call.
  std::map<int64_t, std::vector<std::pair<size_t, int64_t>>> sizes;
  int64_t smallest = INT64_MAX;
  for (size_t g : groups) smallest = std::min(smallest, begin[g + 1] - begin[g]);
  for (size_t g : groups) {
    const int64_t m = begin[g + 1] - begin[g];
    if (expert_batch_ == ExpertBatch::Classes) {
      sizes[m].push_back({g, 0});
      continue;
    }
    const int64_t base = expert_batch_ == ExpertBatch::Base ? smallest : 0;
    if (base > 0) sizes[base].push_back({g, 0});
    for (int64_t r = base; r < m; r += kBatchedRows) sizes[kBatchedRows].push_back({g, r});
  }
  std::vector<BatchedGemm> calls;
  std::vector<const void*> ptrs;
  std::vector<Tensor> keep;  // the bf16 operands, alive until the GEMMs are queued
  // Products run in sets: a product joins the set before it where it writes another output with
  // the same beta (gate and up: one call per block size for both, half the launches and fuller
  // waves), and starts a new set where it adds to an output of that set (the terms of a sum).
  size_t first = 0;
  while (first < products.size()) {
    size_t last = first + 1;
    auto joins = [&](const BatchedProduct& p) {
      if (p.beta != products[first].beta || p.c->dtype() != products[first].c->dtype())
        return false;
      for (size_t q = first; q < last; ++q)
        if (products[q].c->raw() == p.c->raw()) return false;
      return cols(*p.c) == N && cols(*p.a) == K;
    };
    while (last < products.size() && joins(products[last])) ++last;
    const auto set = products.subspan(first, last - first);
    std::vector<Tensor> a;                    // each product's rows in bf16
    std::vector<std::vector<const void*>> w;  // each product's weights in bf16, by group
    for (const BatchedProduct& p : set) {
      a.push_back(as_bf16(*p.a));
      keep.push_back(a.back());
      // Rounded once per expert (an F32 weight with no bf16 copy), whatever its blocks.
      w.emplace_back(p.b.size(), nullptr);
      for (size_t g : groups) {
        keep.push_back(as_bf16(*p.b[g]));
        w.back()[g] = keep.back().raw();
      }
    }
    for (const auto& [m, gs] : sizes) {
      // Column-major as gemm_row_major: C_g^T [N, rows] = op(W_g)^T a_g^T.
      calls.push_back({.trans_a = trans_b,
                       .m = N,
                       .n = m,
                       .k = K,
                       .lda = trans_b ? K : N,
                       .ldb = K,
                       .ldc = N,
                       .count = int64_t(gs.size() * set.size()),
                       .first = ptrs.size(),
                       .beta = set[0].beta});
      for (size_t i = 0; i < set.size(); ++i)
        for (const auto& [g, r] : gs) ptrs.push_back(w[i][g]);
      for (size_t i = 0; i < set.size(); ++i)
        for (const auto& [g, r] : gs)
          ptrs.push_back(a[i].slice(begin[g] + r, begin[g] + r + m).raw());
      for (const BatchedProduct& p : set)
        for (const auto& [g, r] : gs)
          ptrs.push_back(p.c->slice(begin[g] + r, begin[g] + r + m).raw());
    }
    first = last;
  }
  run_batched_gemms(cublas_, calls, ptrs, cuda_type(products[0].c->dtype()), "grouped_matmul");
}

// The padded expert blocks' weight gradients, batched as their forward (grouped_matmul_batched):
// one GEMM per expert was measured at ~330 TFLOP/s on V2-Lite's shapes against ~780 for the
// batched calls, and full fine-tuning runs three such GEMMs per expert and layer. Experts of equal
// row count share one call; the padding rows are zero in dy and x, so they add nothing. Anything
// else (an unpadded block with a gradient, no bf16, MOEKIT_CUDA_EXPERT_GEMM other than batched)
// takes the per-expert loop of the base class.
void CudaBackend::grouped_weight_grad(std::span<Tensor* const> dw, const Tensor& dy_in,
                                      const Tensor& x_in, std::span<const int64_t> begin) {
  const char* op = "grouped_weight_grad";
  const auto [N, K] = grouped_weight_grad_dims(dw, dy_in, x_in, begin);
  expect_gemm_operand(dy_in, op, "dy");
  expect_gemm_operand(x_in, op, "x");
  for (const Tensor* w : dw)
    if (w) cuda::expect_f32(*w, op, "dw");
  // As grouped_matmul_terms: a BF16 operand or the Bf16 precision puts the GEMMs in bf16.
  const bool bf16 =
      precision_ == Precision::Bf16 || dy_in.dtype() == DType::BF16 || x_in.dtype() == DType::BF16;
  bool padded = bf16 && padded_expert_gemms();
  std::map<int64_t, std::vector<size_t>> sizes;  // rows -> the selected groups of that many rows
  for (size_t g = 0; g < dw.size(); ++g) {
    const int64_t m = begin[g + 1] - begin[g];
    if (!dw[g] || m == 0) continue;
    padded = padded && m % kBatchedRows == 0;
    sizes[m].push_back(g);
  }
  if (sizes.empty() || N == 0 || K == 0) return;
  if (!padded) return Backend::grouped_weight_grad(dw, dy_in, x_in, begin);
  const Tensor dy = as_bf16(dy_in), x = as_bf16(x_in);  // alive until the GEMMs are queued
  std::vector<BatchedGemm> calls;
  std::vector<const void*> ptrs;
  for (const auto& [m, gs] : sizes) {
    // Column-major as gemm_row_major (matmul with trans_a): dw_g^T [K, N] = x_g^T [K, rows] @
    // (dy_g^T [N, rows])^T, added to dw_g (beta 1).
    calls.push_back({.trans_b = true,
                     .m = K,
                     .n = N,
                     .k = m,
                     .lda = K,
                     .ldb = N,
                     .ldc = K,
                     .count = int64_t(gs.size()),
                     .first = ptrs.size(),
                     .beta = 1.0f});
    for (size_t g : gs) ptrs.push_back(x.slice(begin[g], begin[g + 1]).raw());
    for (size_t g : gs) ptrs.push_back(dy.slice(begin[g], begin[g + 1]).raw());
    for (size_t g : gs) ptrs.push_back(dw[g]->raw());
  }
  run_batched_gemms(cublas_, calls, ptrs, CUDA_R_32F, op);
}

int64_t CudaBackend::expert_row_alignment(int64_t pairs, int64_t n_experts) const {
  // Padding costs up to 127 rows per expert. Measured on the H200 (tools/expert_gemm_bench.cu,
  // V2-Lite's expert GEMMs, top-6 of 64): at a mean of 768 rows per expert 9 % more work for 2.5x
  // the speed of the grouped GEMM, at 192 rows 2.0x, at 96 rows 1.45x, at 48 rows (167 % padding)
  // about equal. So pad from a mean of 64 rows.
  constexpr int64_t kMinMeanRows = 64;
  if (!padded_expert_gemms() || precision_ != Precision::Bf16 || n_experts <= 0) return 1;
  return pairs >= kMinMeanRows * n_experts ? kBatchedRows : 1;
}

// The bf16 attention path's GEMMs (cuda_attention_tc.cpp): many heads per call, operands at
// strided offsets inside [tokens, heads, dim] tensors. Same operand swap as matmul.
void CudaBackend::gemm_batched(void* c, DType c_dtype, int64_t ldc, int64_t stride_c,
                               const GemmOperand& a, const GemmOperand& b, int64_t M, int64_t N,
                               int64_t K, int64_t batch, float alpha, float beta) {
  if (M == 0 || N == 0 || batch == 0) return;
  constexpr int64_t kInt = 2147483647;
  MOEKIT_CHECK(M <= kInt && N <= kInt && K <= kInt && batch <= kInt && ldc <= kInt &&
                   a.ld <= kInt && b.ld <= kInt,
               "gemm_batched: M {} N {} K {} batch {} exceed cuBLAS's int", M, N, K, batch);
  check_cublas(cublas().gemm_strided_batched_ex(
                   static_cast<cublasHandle_t>(cublas_), b.trans ? CUBLAS_OP_T : CUBLAS_OP_N,
                   a.trans ? CUBLAS_OP_T : CUBLAS_OP_N, int(N), int(M), int(K), &alpha, b.ptr,
                   cuda_type(b.dtype), int(b.ld), b.stride, a.ptr, cuda_type(a.dtype), int(a.ld),
                   a.stride, &beta, c, cuda_type(c_dtype), int(ldc), stride_c, int(batch),
                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
               "gemm_batched (cublasGemmStridedBatchedEx)");
}

void CudaBackend::matmul_batched(Tensor& c, const Tensor& a_in, const Tensor& b_in, bool trans_a,
                                 bool trans_b, float alpha, float beta, const GemmBatch& g) {
  check_gemm_batch(c, a_in, b_in, trans_a, trans_b, g);
  for (const Tensor* t : {&a_in, &b_in})
    if (t->dtype() != DType::F32 && t->dtype() != DType::BF16)
      fail("CUDA matmul_batched: input {} (supported: F32, BF16)", dtype_name(t->dtype()));
  cuda::expect(a_in, a_in.dtype(), "matmul_batched", "a");
  cuda::expect(b_in, b_in.dtype(), "matmul_batched", "b");
  cuda::expect_f32(c, "matmul_batched", "c");
  if (g.count == 0 || g.m == 0 || g.n == 0) return;
  MOEKIT_CHECK(g.k > 0, "CUDA matmul_batched: k = 0 is not supported");
  // As matmul: a BF16 operand or the Bf16 precision runs on the bf16 tensor cores (both operands
  // rounded: cuBLAS's batched GEMM takes one input type), accumulation in fp32.
  const bool bf16 =
      a_in.dtype() == DType::BF16 || b_in.dtype() == DType::BF16 || precision_ == Precision::Bf16;
  const Tensor a = bf16 ? as_bf16(a_in) : a_in, b = bf16 ? as_bf16(b_in) : b_in;
  const cublasComputeType_t compute =
      !bf16 && precision_ == Precision::Tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  // Column-major view as in matmul: C_g^T = op(B_g)^T op(A_g)^T.
  const auto ta = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const auto tb = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  check_cublas(cublas().gemm_strided_batched_ex(
                   static_cast<cublasHandle_t>(cublas_), tb, ta, int(g.n), int(g.m), int(g.k),
                   &alpha, b.raw(), cuda_type(b.dtype()), int(g.ldb), g.stride_b, a.raw(),
                   cuda_type(a.dtype()), int(g.lda), g.stride_a, &beta, c.raw(), CUDA_R_32F,
                   int(g.ldc), g.stride_c, int(g.count), compute, CUBLAS_GEMM_DEFAULT),
               "matmul_batched (cublasGemmStridedBatchedEx)");
}

// The conversion that matmul runs per F32 operand under Bf16 (as_bf16), as an op of its own: the
// same kernel, so a BF16 copy made here feeds a GEMM exactly the values matmul would have made.
void CudaBackend::round_bf16(Tensor& out, const Tensor& x) {
  MOEKIT_CHECK(out.numel() == x.numel(), "round_bf16: {} vs {}", out.shape().str(),
               x.shape().str());
  cuda::expect(out, DType::BF16, "round_bf16", "out");
  cuda::expect_f32(x, "round_bf16", "x");
  if (x.numel() == 0) return;
  check(cuda::convert_f32_bf16(out.raw(), x.f32(), x.numel()), "round_bf16");
  profile_count_rounding(x.numel());
}

// matmul's GEMV path (few rows, F32 activations read as they are).
int64_t CudaBackend::unrounded_gemv_rows() const {
  return cuda::kGemvMaxRows;
}

// ---------------------------------------------------------------------------------------------
// Elementwise

void CudaBackend::add(Tensor& y, const Tensor& x, float alpha) {
  MOEKIT_CHECK(y.numel() == x.numel(), "add: {} vs {}", y.shape().str(), x.shape().str());
  cuda::expect_f32(y, "add", "y");
  cuda::expect_f32(x, "add", "x");
  if (y.numel() == 0) return;
  check(cuda::add(y.f32(), x.f32(), y.numel(), alpha), "add");
}

void CudaBackend::scale(Tensor& y, float alpha) {
  cuda::expect_f32(y, "scale", "y");
  if (y.numel() == 0) return;
  check(cuda::scale(y.f32(), y.numel(), alpha), "scale");
}

// ---------------------------------------------------------------------------------------------
// Index checks

cuda::IndexCheck CudaBackend::index_check(const Tensor& idx, int64_t limit, const char* op,
                                          const char* what, bool allow_negative) {
  cuda::expect(idx, DType::I32, op, what);
  if (idx.numel() == 0) return {};      // no slot: nothing to check
  if (limit <= 0 && !allow_negative) {  // no valid replacement: every entry is bad
    int32_t value = 0;
    check(cudaMemcpy(&value, idx.i32(), 4, cudaMemcpyDeviceToHost), op);
    fail("{}: {} {} at position 0 out of range [0, {})", op, what, value, limit);
  }
  cuda::IndexCheck c;
  c.slot = index_error_;
  c.limit = limit;
  c.replacement = limit > 0 ? 0 : -1;
  c.allow_negative = allow_negative;
  std::lock_guard<std::mutex> lock(checks_mu_);
  const CheckSite site{op, what, limit};
  auto it = check_ids_.find(site);
  if (it == check_ids_.end()) {
    check_sites_.push_back(site);
    it = check_ids_.emplace(site, int32_t(check_sites_.size())).first;
  }
  c.check = it->second;
  checks_pending_ = true;
  ++check_epoch_;
  return c;
}

Tensor CudaBackend::check_indices(const Tensor& idx, int64_t limit, const char* op,
                                  const char* what, bool allow_negative) {
  const cuda::IndexCheck c = index_check(idx, limit, op, what, allow_negative);
  Tensor safe = scratch(idx.shape(), DType::I32);
  check(cuda::check_indices(safe.i32(), idx.i32(), idx.numel(), c), op);
  return safe;
}

bool CudaBackend::stage_index_errors(uint64_t& epoch, const char* op, void* stream) {
  std::lock_guard<std::mutex> lock(checks_mu_);
  epoch = check_epoch_;
  if (!checks_pending_) return false;
  check(cudaMemcpyAsync(error_staging_, index_error_, sizeof(cuda::IndexError),
                        cudaMemcpyDeviceToHost,
                        stream ? static_cast<cudaStream_t>(stream) : cuda::stream()),
        op);
  return true;
}

void CudaBackend::raise_index_errors(bool staged) {
  std::string message;
  {
    std::lock_guard<std::mutex> lock(checks_mu_);
    if (!checks_pending_) return;
    cuda::IndexError e;
    if (staged)
      e = *error_staging_;
    else
      check(cudaMemcpy(&e, index_error_, sizeof e, cudaMemcpyDeviceToHost), "index check");
    if (e.check > 0 && size_t(e.check) <= check_sites_.size()) {
      const CheckSite& p = check_sites_[size_t(e.check) - 1];
      message = fmt::format("{}: {} {} at position {} out of range [0, {})", p.op, p.what, e.value,
                            e.position, p.limit);
      check(cudaMemset(index_error_, 0, sizeof e), "index check");
    }
    checks_pending_ = false;
  }
  if (!message.empty()) fail("{}", message);
}

}  // namespace moekit
