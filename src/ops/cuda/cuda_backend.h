// CudaBackend: the op set (ops/ops.h) on an NVIDIA GPU. cuBLAS does the GEMMs; every other op is a
// kernel of ours, because each is a small fused pass (a norm, a gate, a gather) that no library
// provides in moekit's layout. All work is queued on one stream (ops/cuda/stream.h), so kernels run
// in call order and a host copy waits for the work before it. Results are deterministic: no kernel
// accumulates floats with atomics (scatters go through a sorted plan, reductions use fixed trees).
// Host side (C++ compiler): cuda_backend.cpp (device, memory, GEMM, add/scale, index checks) and
// cuda_ops.cpp (argument checks and launches of every other op), cuda_attention_tc.cpp (attention
// on the bf16 tensor cores, the Bf16 precision's path). Kernels (nvcc), behind kernels.h:
// cuda_elementwise.cu (fills, SwiGLU, RoPE, embedding, column copies, MLA split), cuda_norm.cu,
// cuda_attention.cu, cuda_attention_tc.cu, cuda_decode.cu (causal softmax, argmax, the cache's
// set_rows, split-K latent attention), cuda_sample.cu (sampling with a temperature), cuda_moe.cu
// (gate, dispatch/combine, few-token expert GEMVs), cuda_loss.cu, cuda_optim.cu (AdamW, sum of
// squares).
#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <tuple>
#include <vector>

#include "ops/ops.h"

namespace moekit {

namespace cuda {
struct IndexError;  // ops/cuda/kernels.h
struct IndexCheck;
}  // namespace cuda

// The index in `choices` of the value of environment variable `name`, or `unset` where it is not
// set; any other value is an error naming the variable, the choices and the value ("NAME must be
// a, b or c, got \"x\""). For the backend's switches (MOEKIT_CUDA_EXPERT_GEMM, ...).
size_t env_choice(const char* name, std::span<const char* const> choices, size_t unset);

// A size-bucketed cache of device blocks: cudaFree synchronises the whole device, and layers
// allocate and drop activations every step. Blocks are reused only after their tensor is gone;
// since all work is on one stream, a later kernel cannot overtake an earlier user of the block.
class CudaAllocator {
 public:
  void* get(size_t bytes);
  void put(void* p, size_t bytes);
  void release_cached();  // frees every cached block (retry path when cudaMalloc fails)
  size_t cached_bytes();  // bytes held in cached blocks
  size_t peak_bytes();    // most bytes handed out at once (live tensors, bucket-rounded)
  void open_window();     // Backend::open_memory_window
  size_t close_window();
  static size_t bucket(size_t bytes);

 private:
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t in_use_ = 0, peak_ = 0;
  std::vector<size_t> windows_;  // the peak of each open window, innermost last
};

// The device blocks of one captured graph (CudaBackend::capture): what the recorded ops allocate
// comes from here and stays reserved while the graph or any tensor allocated during the capture
// lives, since every replay writes to the same addresses. Blocks freed during the capture are
// reused by later allocations of the same capture (a graph recorded from one stream replays in
// that order, like the stream did).
struct CapturePool {
  explicit CapturePool(CudaAllocator& a) : alloc(a) {}
  ~CapturePool();
  void* get(size_t bytes);
  void put(void* p, size_t bytes);

  CudaAllocator& alloc;
  std::mutex mu;
  std::multimap<size_t, void*> free;            // bucket -> block, reusable during the capture
  std::vector<std::pair<void*, size_t>> owned;  // every block, back to `alloc` at the end
  std::vector<Tensor> keep;  // memory from outside the pool that the graph reads (cached tables)
  bool recording = true;
};

class CudaBackend final : public Backend {
 public:
  CudaBackend();
  Device device() const override { return Device::CUDA; }
  bool supports(Op op, DType dtype) const override;

  std::shared_ptr<Storage> allocate(size_t bytes) override;
  void copy(Tensor& dst, const Tensor& src) override;
  std::unique_ptr<PendingHostCopy> copy_to_host_async(const Tensor& src) override;
  void fill(Tensor& t, float value) override;
  void memory_info(size_t& free_bytes, size_t& total_bytes) override;
  size_t peak_bytes() override { return alloc_.peak_bytes(); }
  void open_memory_window() override { alloc_.open_window(); }
  size_t close_memory_window() override { return alloc_.close_window(); }
  void synchronize() override;
  std::unique_ptr<CapturedWork> capture(const std::function<void()>& work) override;
  void set_precision(Precision p) override { precision_ = p; }
  Precision precision() const override { return precision_; }

  void matmul(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, float alpha,
              float beta) override;
  void grouped_matmul(Tensor& c, const Tensor& a, std::span<const Tensor* const> b,
                      std::span<const int64_t> begin, bool trans_b, float beta) override;
  void grouped_matmul_sum(Tensor& c, std::span<const GroupedTerm> terms,
                          std::span<const int64_t> begin, bool trans_b, float beta) override;
  void matmul_pair(Tensor& y0, Tensor& y1, const Tensor& x, const Tensor& w0,
                   const Tensor& w1) override;
  void grouped_swiglu(Tensor& h, Tensor* gate, Tensor* up, const Tensor& x,
                      std::span<const Tensor* const> gate_w, std::span<const Tensor* const> up_w,
                      std::span<const int64_t> begin) override;
  void grouped_weight_grad(std::span<Tensor* const> dw, const Tensor& dy, const Tensor& x,
                           std::span<const int64_t> begin) override;
  void matmul_batched(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b,
                      float alpha, float beta, const GemmBatch& batch) override;
  void round_bf16(Tensor& out, const Tensor& x) override;
  int64_t unrounded_gemv_rows() const override;
  void add(Tensor& y, const Tensor& x, float alpha) override;
  void scale(Tensor& y, float alpha) override;
  void embedding_forward(Tensor& out, const Tensor& table, const Tensor& ids) override;
  void embedding_backward(Tensor& dtable, const Tensor& dout, const Tensor& ids) override;
  void rmsnorm_forward(Tensor& out, Tensor& rstd, const Tensor& x, const Tensor& w,
                       float eps) override;
  void rmsnorm_backward(Tensor& dx, Tensor* dx_bf16, Tensor* dw, const Tensor& dout,
                        const Tensor& x, const Tensor& w, const Tensor& rstd,
                        bool accumulate) override;
  void swiglu_forward(Tensor& h, const Tensor& gate, const Tensor& up) override;
  void swiglu_backward(Tensor& dgate, Tensor& dup, const Tensor& dh, const Tensor& gate,
                       const Tensor& up) override;
  void swiglu_scaled_backward(Tensor& dgate, Tensor& dup, Tensor& dscale, const Tensor& dout,
                              const Tensor& gate, const Tensor& up, const Tensor& scale) override;
  void rope(Tensor& out, const Tensor& x, int64_t heads, int64_t head_stride, int64_t offset,
            int64_t rope_dim, const Tensor& cos, const Tensor& sin, const Tensor& positions,
            bool inverse) override;
  void attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                         const Tensor& v, int64_t batch, int64_t seq, int64_t heads,
                         float scale) override;
  void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& out,
                          const Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                          int64_t batch, int64_t seq, int64_t heads, float scale) override;
  void causal_softmax(Tensor& x, int64_t group, int64_t offset) override;
  void argmax(Tensor& idx, const Tensor& x, int64_t n) override;
  void sample(Tensor& id, const Tensor& logits, int64_t n, const SampleParams& p,
              double u01) override;
  void set_rows(Tensor& dst, const Tensor& src, const Tensor& rows) override;
  void latent_attention(Tensor& ctx, const Tensor& q_lat, const Tensor& q_rope,
                        const Tensor& kv_latent, const Tensor& k_rope, const Tensor& positions,
                        int64_t heads, float scale) override;
  void mla_cache_write(Tensor& kv_latent, Tensor& k_rope, const Tensor& kv_a, const Tensor& norm_w,
                       float eps, const Tensor& cos, const Tensor& sin,
                       const Tensor& positions) override;
  void mla_kv_a_split(Tensor& kv_latent, Tensor& rstd, Tensor& k_rope, const Tensor& kv_a,
                      const Tensor& norm_w, float eps, const Tensor& cos, const Tensor& sin,
                      const Tensor& positions) override;
  void mla_absorb_query(Tensor& q_lat, Tensor& q_rope, const Tensor& q, const Tensor& kv_b,
                        const Tensor& cos, const Tensor& sin, const Tensor& positions,
                        int64_t heads, int64_t dn, int64_t dr, int64_t dv) override;
  void mla_value_heads(Tensor& o, const Tensor& ctx, const Tensor& kv_b, int64_t heads, int64_t dn,
                       int64_t dv) override;
  void cross_entropy_forward(Tensor& losses, const Tensor& logits, const Tensor& targets) override;
  void cross_entropy_backward(Tensor& dlogits, const Tensor& logits, const Tensor& targets,
                              float scale) override;
  void cross_entropy_fused(Tensor& losses, Tensor& dlogits, const Tensor& logits,
                           const Tensor& targets, float scale) override;
  void gather_rows(Tensor& out, const Tensor& x, const Tensor& rows,
                   const Tensor* weights) override;
  void scatter_add_rows(Tensor& out, const Tensor& x, const Tensor& rows,
                        const Tensor* weights) override;
  void combine_slots(Tensor& out, const Tensor& x, const Tensor& slot_token,
                     const Tensor& token_slots, const Tensor* weights) override;
  void copy_columns(Tensor& dst, int64_t dst_col, const Tensor& src, int64_t src_col, int64_t n,
                    bool accumulate) override;
  void mla_split_kv(Tensor& k, Tensor& v, const Tensor& kv_b, const Tensor& k_rope, int64_t heads,
                    int64_t dn, int64_t dr, int64_t dv) override;
  void mla_split_kv_backward(Tensor& dkv_b, Tensor& dk_rope, const Tensor& dk, const Tensor& dv,
                             int64_t heads, int64_t dn, int64_t dr, int64_t dvd) override;
  void mla_kv_up(Tensor& k, Tensor& v, const Tensor& kv_latent, const Tensor& w_kv_b,
                 const Tensor& k_rope, int64_t heads, int64_t dn, int64_t dr, int64_t dv) override;
  void moe_gate_forward(Tensor& topk_idx, Tensor& topk_w, Tensor& scores, const Tensor& logits,
                        const Tensor& bias, const GateParams& p) override;
  void moe_gate_backward(Tensor& dlogits, const Tensor& dtopk_w, const Tensor& topk_idx,
                         const Tensor& scores, const Tensor& dscores, const GateParams& p) override;
  void moe_dispatch_plan(Tensor& slot_token, Tensor& slot_pair, Tensor& slot_weight,
                         Tensor& token_slots, Tensor& expert_begin, Tensor& expert_rows,
                         const Tensor& topk_idx, const Tensor& topk_w, int64_t n_experts,
                         int64_t align) override;
  int64_t expert_row_alignment(int64_t pairs, int64_t n_experts) const override;
  void moe_experts_small(Tensor& y, const Tensor& x, const Tensor& topk_idx, const Tensor& topk_w,
                         std::span<const ExpertWeights> experts, bool accumulate,
                         const ExpertWeights* shared = nullptr) override;
  void adamw_step(Tensor& w, Tensor& m, Tensor& v, const Tensor& g, const AdamWStep& s,
                  Tensor* w_bf16) override;
  double sum_squares(const Tensor& x) override;

  // Range check of an I32 index tensor that an op's kernel dereferences, without waiting for the
  // device: returns the indices to launch with (a scratch copy in which out-of-range entries are
  // replaced by a valid one, so no kernel leaves its buffers), and records the first bad
  // (position, value) in the backend's device-side error slot. The next call that waits for the
  // device anyway (a copy to the host, memory_info, sum_squares) raises it as
  // "<op>: <what> <value> at position <i> out of range [0, <limit>)".
  // allow_negative: negative entries are valid (ignored cross-entropy targets).
  [[nodiscard]] Tensor check_indices(const Tensor& idx, int64_t limit, const char* op,
                                     const char* what, bool allow_negative = false);
  // The same check done by the op's own kernel (the ops of a decode step: rope, set_rows,
  // embedding_forward, moe_experts_small, latent_attention, mla_*), which saves the check kernel
  // and the copy: returns the descriptor to pass to it (cuda::IndexCheck, ops/cuda/index_check.cuh)
  // and marks checks pending; launches nothing. Same errors and messages as check_indices (which
  // uses it).
  [[nodiscard]] cuda::IndexCheck index_check(const Tensor& idx, int64_t limit, const char* op,
                                             const char* what, bool allow_negative = false);
  // Raises the first index error recorded since the last call, if any; waits for the device
  // when checks are pending. staged: the slot was copied to error_staging_ in stream order and
  // the stream has been waited for since (copy to the host): read that, no second copy.
  void raise_index_errors(bool staged = false);
  // Queues the error slot's copy into error_staging_ when checks are pending (true then), for a
  // copy to the host that waits anyway; epoch: the checks queued so far (CudaPendingHostCopy
  // reads the staged slot only while no check was queued after it).
  // stream (cudaStream_t, opaque): where the copy goes (null: the compute stream; the stream
  // given must be ordered after every queued check).
  bool stage_index_errors(uint64_t& epoch, const char* op, void* stream = nullptr);
  // A replayed graph ran index checks: the next synchronising call reads the error slot.
  void note_checks_pending() { checks_pending_ = true; }

  // A device copy of `bytes` of host data that lives in the general cache even while a graph is
  // recorded (tables kept across steps); while recording it is uploaded off the recorded stream.
  Tensor upload_table(const void* data, size_t bytes, const char* op);

  // Scratch device memory from the caching allocator, released when the tensor goes.
  Tensor scratch(Shape shape, DType dtype);
  // `t` itself when it is BF16, else a BF16 scratch copy of the F32 tensor `t` (GEMM inputs on
  // the bf16 tensor cores).
  Tensor as_bf16(const Tensor& t);

  // One operand of gemm_batched: matrix i is row-major at ptr + i * stride elements, with leading
  // dimension ld (elements between rows); trans: use it transposed.
  struct GemmOperand {
    const void* ptr = nullptr;
    DType dtype = DType::F32;
    int64_t ld = 0, stride = 0;
    bool trans = false;
  };
  // For i < batch: C_i[M,N] = alpha * op(A_i) @ op(B_i) + beta * C_i (row-major, C_i at c + i *
  // stride_c elements, leading dim ldc), on cuBLAS with fp32 accumulation. The strides let one
  // call cover every head of a [tokens, heads, dim] tensor (stride = dim, ld = heads * dim).
  void gemm_batched(void* c, DType c_dtype, int64_t ldc, int64_t stride_c, const GemmOperand& a,
                    const GemmOperand& b, int64_t M, int64_t N, int64_t K, int64_t batch,
                    float alpha, float beta);

 private:
  void expect_attention_inputs(const Tensor& q, const Tensor& k, const Tensor& v,
                               const char* op) const;
  void expect_attention_output(const Tensor& out, const char* op) const;
  // Attention under Precision::Bf16 (cuda_attention_tc.cpp): batched bf16 GEMMs on the tensor
  // cores around fp32 softmax kernels; arguments already checked by attention_forward/backward.
  void attention_forward_tc(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                            const Tensor& v, int64_t batch, int64_t seq, int64_t heads,
                            float scale);
  void attention_backward_tc(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout,
                             const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& k,
                             const Tensor& v, int64_t batch, int64_t seq, int64_t heads,
                             float scale);

  // What grouped_matmul's arguments allow, after checking them: bf16 in play, K = 0, the
  // non-empty groups, and whether every group is a padded block for the batched GEMMs.
  struct GroupedRoute {
    bool bf16 = false, k_zero = false;
    std::vector<size_t> groups;
    bool padded = false;
  };
  GroupedRoute grouped_route(const Tensor& c, std::span<const GroupedTerm> terms,
                             std::span<const int64_t> begin, bool trans_b, float beta);
  // grouped_matmul(_sum) after the argument checks: one cuBLAS grouped GEMM over every term's
  // groups where bf16 is in play (grouped_matmul_bf16), else term by term (fp32 / tf32 grouped
  // GEMM, or bf16 GEMMs per expert on side streams).
  void grouped_matmul_terms(Tensor& c, std::span<const GroupedTerm> terms,
                            std::span<const int64_t> begin, bool trans_b, float beta);
  // The bf16 grouped GEMM of the non-empty `groups` of every term (arguments checked).
  void grouped_matmul_bf16(Tensor& c, std::span<const GroupedTerm> terms,
                           const std::vector<size_t>& groups, std::span<const int64_t> begin,
                           bool trans_b, float beta);
  // One product of grouped_matmul_batched: c = beta c + (a_g b_g^T per group g); all of one
  // call's products share c's dtype and columns and a's columns.
  struct BatchedProduct {
    Tensor* c = nullptr;
    const Tensor* a = nullptr;
    std::span<const Tensor* const> b;
    float beta = 0.0f;
  };
  // The products where every group's rows are a multiple of kBatchedRows (a padded dispatch
  // plan), in order: one batched GEMM per distinct group size for each run of products that
  // write distinct outputs with the same beta (arguments checked).
  void grouped_matmul_batched(std::span<const BatchedProduct> products,
                              const std::vector<size_t>& groups, std::span<const int64_t> begin,
                              bool trans_b);

  void* cublas_ = nullptr;  // cublasHandle_t, kept opaque so this header needs no CUDA include
  // Side streams for concurrent expert GEMMs (grouped_matmul's bf16 path), each with its own
  // cuBLAS handle (a handle's workspace must not be shared by concurrent GEMMs); created on
  // first use. cudaStream_t / cublasHandle_t / cudaEvent_t, opaque as above.
  static constexpr size_t kSideStreams = 4;
  // How the bf16 expert GEMMs run (MOEKIT_CUDA_EXPERT_GEMM): Batched (the default: expert blocks
  // padded to kBatchedRows where it pays, cuBLAS batched GEMMs per block size), Own (Hopper only:
  // the same padding, and the forward's expert GEMMs, trans_b into a BF16 output, in one launch
  // of moekit's kernel with SwiGLU fused, cuda_expert_gemm.cu; still slower than Batched, see
  // there; what it does not cover runs as Batched), Grouped (cuBLAS's grouped GEMM, no padding)
  // or Streams (one GEMM per expert on side streams, no padding).
  enum class ExpertGemm { Own, Batched, Grouped, Streams } expert_gemm_ = ExpertGemm::Batched;
  // How grouped_matmul_batched cuts the padded expert blocks into batched problems
  // (MOEKIT_CUDA_EXPERT_BATCH): Blocks (the default: every kBatchedRows-row block one problem of
  // a single call), Classes (each expert whole, one call per distinct size) or Base (the rows
  // every expert has in one call, the blocks past them in a second). Measured on the H200
  // (tools/expert_gemm_bench.cu, V2-Lite's gate/up shapes, 8192 tokens): Blocks 790-800 TFLOP/s
  // of useful work whatever the routing's skew, Classes 786 with a uniform routing (2 sizes) but
  // 630-690 with a skewed one (10-15 sizes: a partial last wave per call); 4-layer prefill
  // 480.8k -> 497.8k tok/s.
  enum class ExpertBatch { Classes, Blocks, Base } expert_batch_ = ExpertBatch::Blocks;
  bool padded_expert_gemms() const {
    return expert_gemm_ == ExpertGemm::Own || expert_gemm_ == ExpertGemm::Batched;
  }
  // The row multiple of the padded expert blocks: cuBLAS's Hopper kernels and ours tile 128 rows.
  static constexpr int64_t kBatchedRows = 128;
  // The expert GEMM of our own where it applies (Own, c and the kept products BF16, every group a
  // multiple of kBatchedRows rows, K % 8 == 0, N even, operands TMA can describe): c = the
  // products of a with w0 (w1 empty), or c = silu(a w0^T) * (a w1^T) with the products into gate
  // and up where not null. False, with nothing done, elsewhere.
  bool own_expert_gemm(Tensor& c, Tensor* gate, Tensor* up, const Tensor& a,
                       std::span<const Tensor* const> w0, std::span<const Tensor* const> w1,
                       std::span<const int64_t> begin);
  // Device tables of the expert GEMM's weight tensor maps ([experts][2], 128 bytes each), keyed
  // by what they encode (address, rows, columns of each weight): a layer's weights stay where
  // they are, so each table is encoded and uploaded once. Bounded (cleared when it grows past
  // kMaxWeightMaps tables: bf16 copies made per call would otherwise add one each time).
  std::map<std::vector<int64_t>, Tensor> weight_maps_;
  static constexpr size_t kMaxWeightMaps = 1024;
  std::vector<void*> side_streams_, side_cublas_, side_done_;
  void* side_fork_ = nullptr;
  void fork_side_streams(size_t n);        // the first n side streams wait for the default stream
  void join_side_streams(size_t n);        // the default stream waits for them
  Precision precision_ = Precision::Fp32;  // initially from MOEKIT_CUDA_FP32_GEMM
  CudaAllocator alloc_;
  // Set while capture() records: allocations come from the graph's pool.
  std::shared_ptr<CapturePool> capture_pool_;
  // Every distinct index check site (op, what, limit) seen, so that an error recorded by a kernel
  // can be named however long ago the check was queued (a graph replays its checks at every
  // step); check id = position + 1. Sites are few (ops x shapes).
  struct CheckSite {
    const char* op;
    const char* what;
    int64_t limit;
    bool operator<(const CheckSite& o) const {
      return std::tie(op, what, limit) < std::tie(o.op, o.what, o.limit);
    }
  };
  std::mutex checks_mu_;
  std::vector<CheckSite> check_sites_;
  std::map<CheckSite, int32_t> check_ids_;
  bool checks_pending_ = false;                // checks queued since the error slot was last read
  cuda::IndexError* index_error_ = nullptr;    // device memory, one slot
  cuda::IndexError* error_staging_ = nullptr;  // pinned host memory: its copy (copy to the host)
  uint64_t check_epoch_ = 0;  // index_check calls so far: a staged slot is current while equal
  // copy_to_host_async: pinned staging (grown as needed, so the copy is truly asynchronous), the
  // event recorded after it (cudaEvent_t, opaque), its own stream and the event on the compute
  // stream it waits for, and whether a copy is in flight.
  void* host_staging_ = nullptr;
  size_t host_staging_bytes_ = 0;
  void* host_copy_done_ = nullptr;
  void* copy_stream_ = nullptr;
  void* copy_ready_ = nullptr;
  bool host_copy_pending_ = false;
  friend class CudaPendingHostCopy;
  // Device copies of moe_experts_small's weight pointer tables, keyed by their contents (so a
  // cached table is never stale): a layer's weights stay where they are between decode steps, so
  // each layer's table goes up once and a step uploads nothing (no copy to wait for or capture).
  std::mutex tables_mu_;
  std::map<std::vector<const void*>, Tensor> expert_tables_;
  // argmax's per-row slots (best key as two I32s per row, then a block count per row), zero
  // between calls: the kernel's last block resets them.
  Tensor argmax_slots_;
  // sample's scratch (cuda::kSampleScratchBytes: its search state and bucket histograms), zero
  // between calls: the op's last kernel resets it.
  Tensor sample_scratch_;
};

// The process-wide CUDA backend; null when no GPU is visible (or the driver reports an error).
Backend* cuda_backend();

}  // namespace moekit
