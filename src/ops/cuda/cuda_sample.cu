// CUDA kernels of Backend::sample: one token drawn from a logits row with a temperature, top-k and
// top-p, without reading the row back (the host copy of a 102,400-token row and its CPU sampling
// took ~1.2 ms per token, a third of a decode step).
//
// Every cut of the rule (ops.h) is a position in the most-likely-first order: the k-th token,
// the end of the nucleus (the first prefix whose mass reaches top_p * z), the pick (the first
// prefix whose mass exceeds u01 * kept mass). So the op never sorts: it finds each position by a
// radix search over the logits' ordered bits. A level histograms the tokens of the current bucket
// by the next bits (count and mass per bucket; 11 + 11 + 10 bits, so three levels give the exact
// logit at the position), and the level's last block to finish walks the buckets most likely
// first to the one where the running count or mass reaches the target. Ties (equal logits) have
// equal masses, so the rank inside the tie group comes from arithmetic, and the tied token of that
// rank is the one of that rank in id order (a scan of the row, only when the pick lands past the
// first of several tied tokens).
//
// Masses are integers, w * 2^40 rounded (w = exp((x - max) / T) rounded to fp32 as on the CPU, 1
// for the most likely token), summed with integer atomics: exact whatever the order, so the
// choice is deterministic and every level's bucket masses add up exactly to its parent's. Against
// the CPU's double sums the rounding moves a boundary by at most n * 2^-41 of the mass (which is
// >= 1): 5e-8 at 102,400 tokens; the exp in double rounded to fp32 may differ from glibc's expf
// by one fp32 ulp (6e-8) on rare tokens. Kernels per call: the maximum, then three levels per
// search: top-k (when 0 < k < n), nucleus (when top_p < 1) and the pick (10 at most); with no
// cut, one pass that walks the row in id order (2). Each kernel reads the row (400 KB at
// 102,400 tokens, L2-resident after the first) over 100 blocks; a level's serial tail is one
// block's scan of 2048 buckets. Not yet timed on a GPU: expected a few us per kernel, so
// ~10-30 us per token. All scratch is one zeroed buffer that the last kernel leaves zeroed again.
#include <cub/block/block_scan.cuh>

#include <cmath>

#include "ops/cuda/dependent_launch.cuh"
#include "ops/cuda/device_util.cuh"
#include "ops/cuda/kernels.h"

namespace moekit::cuda {

namespace {

using u64 = unsigned long long;

constexpr int kSampleThreads = 256, kPerThread = 4, kPerBlock = kSampleThreads * kPerThread;
constexpr int kBuckets = 2048;  // the widest level (11 bits); also the most blocks (id order)
constexpr int kLevels = 3;
static_assert(kSampleMaxN == int64_t(kBuckets) * kPerBlock, "one id-order partial per block");
// Level l sorts by the key bits [shift, shift + bits); the bits above are the bucket path so far.
__host__ __device__ constexpr int level_shift(int l) {
  return l == 0 ? 21 : (l == 1 ? 10 : 0);
}
__host__ __device__ constexpr int level_bits(int l) {
  return l == 2 ? 10 : 11;
}
constexpr float kMassScale = 0x1p40f;  // n * 2^40 < 2^62 for n <= kSampleMaxN: no overflow

// What one search carries from level to level and the results it hands to the next search.
struct State {
  unsigned max_key;  // ordered key of the largest logit (sample_max_kernel)
  unsigned done;     // blocks of the running kernel that finished (the last one finishes it)
  unsigned prefix;   // key bits of the running search's bucket, fixed by its previous levels
  unsigned pad;
  u64 count_above;  // tokens before that bucket, most likely first
  u64 mass_above;   // their mass
  u64 target;       // the running search's target (a count for top-k, else a mass)
  u64 z;            // mass of the top-k (top-k search)
  u64 kept;         // mass of the nucleus (nucleus search)
};
static_assert(sizeof(State) <= 64, "the state's slot in the scratch");

// The scratch buffer's parts: [State | mass[kBuckets] | count[kBuckets] | first[kBuckets]].
// first[b] holds 0xffffffff - (lowest id in bucket b), so that zero means none and atomicMax works.
struct Scratch {
  State* state;
  u64* mass;
  unsigned* count;
  unsigned* first;
};

enum class Role : int { TopK, Nucleus, Pick };
struct Search {
  Role role;
  bool topk;     // a top-k search ran before (its mass is State::z)
  bool nucleus;  // a nucleus search ran before (its mass is State::kept)
};

// Floats as unsigned integers in their order (larger = more likely); -0 as +0, which the CPU's
// comparisons treat as equal (ties then go to the lower id on both sides).
__device__ inline unsigned order_key(float v) {
  const unsigned b = v == 0.0f ? 0u : __float_as_uint(v);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ inline float key_value(unsigned k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
// The CPU's fp32 weight exp((x - m) * inv_t) (its argument rounded alike; the exp in double
// rounded to fp32 is glibc's expf in all but rare cases), as an integer mass.
__device__ inline u64 token_mass(float x, float m, float inv_t) {
  const float w = float(exp(double((x - m) * inv_t)));
  return __float2ull_rn(w * kMassScale);
}

__device__ inline int64_t strided(int i) {  // element i of this thread in its block's slice
  return int64_t(blockIdx.x) * kPerBlock + i * kSampleThreads + threadIdx.x;
}

// Whether this block is the last of its grid to get here; every block's earlier global writes
// are then visible to it. Called by all threads.
__device__ inline bool last_block(State* st) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&st->done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (last) __threadfence();
  return last;
}

using BlockScan = cub::BlockScan<u64, kSampleThreads>;

__global__ void __launch_bounds__(kSampleThreads)
    sample_max_kernel(Scratch s, const float* x, int64_t n) {
  __shared__ unsigned red[32];
  allow_dependents();
  wait_for_inputs();
  unsigned key = 0;  // below every float's key
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t j = strided(i);
    if (j < n) key = max(key, order_key(x[j]));
  }
  key = block_reduce(key, 0u, red, Max{});
  if (threadIdx.x == 0) atomicMax(&s.state->max_key, key);
}

// The id of the tied token of rank `rank` (0-based, lower ids first) among the tokens whose key
// is `key`: one block walks the row in tiles, each thread over consecutive ids. Runs only when a
// pick lands past the first of several equal logits.
__device__ int32_t nth_tie(const float* x, int64_t n, unsigned key, u64 rank) {
  __shared__ typename BlockScan::TempStorage scan;
  __shared__ int32_t found;
  if (threadIdx.x == 0) found = -1;
  __syncthreads();
  u64 seen = 0;
  for (int64_t base = 0; base < n; base += kPerBlock) {
    const int64_t mine = base + int64_t(threadIdx.x) * kPerThread;
    u64 count = 0, before = 0, total = 0;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i)
      if (mine + i < n && order_key(x[mine + i]) == key) ++count;
    BlockScan(scan).ExclusiveSum(count, before, total);
    if (count > 0 && seen + before <= rank && rank < seen + before + count) {
      u64 r = seen + before;
      for (int i = 0; i < kPerThread; ++i)
        if (mine + i < n && order_key(x[mine + i]) == key && r++ == rank) found = int32_t(mine + i);
    }
    seen += total;
    __syncthreads();
    const bool stop = found >= 0;
    __syncthreads();  // `found` and the scan's storage are read before the next tile writes them
    if (stop) break;
  }
  return found < 0 ? 0 : found;  // not found only with NaN logits
}

// Level 0's target, from the previous searches' results (or the mass of the whole row).
__device__ u64 search_target(const Search& q, const SampleLaunch& p, const State& st, u64 all) {
  if (q.role == Role::TopK) return u64(p.top_k);
  if (q.role == Role::Nucleus) {  // the first prefix whose mass reaches top_p * z
    const u64 z = q.topk ? st.z : all;
    const u64 t = u64(ceil(double(p.top_p) * double(z)));
    return t < 1 ? 1 : (t > z ? z : t);
  }
  // The pick: the first prefix whose mass exceeds u01 * kept, in integers reaching floor() + 1.
  const u64 kept = q.nucleus ? st.kept : (q.topk ? st.z : all);
  const u64 t = u64(floor(p.u01 * double(kept))) + 1;
  return t > kept ? kept : t;
}

// The level's last block: total the bucket histograms (most likely first), find the bucket where
// the running count (top-k) or mass reaches the target, and narrow the search to it; after the
// last level, the token at the position. Leaves the histograms zeroed.
__device__ void finish_level(int32_t* id, const Scratch& s, const float* x, int64_t n, int level,
                             const Search& q, const SampleLaunch& p) {
  __shared__ typename BlockScan::TempStorage scan;
  __shared__ int s_bucket;
  __shared__ u64 s_count_above, s_mass_above, s_target, s_rank;
  __shared__ unsigned s_key, s_first;
  State& st = *s.state;
  const int bits = level_bits(level), nb = 1 << bits, per = nb / kSampleThreads;
  // This thread's buckets: positions [t * per, (t + 1) * per) of the descending bucket order.
  auto bucket = [&](int i) { return nb - 1 - (int(threadIdx.x) * per + i); };
  u64 count = 0, mass = 0;
  for (int i = 0; i < per; ++i) {
    count += __ldcg(&s.count[bucket(i)]);
    mass += __ldcg(&s.mass[bucket(i)]);
  }
  u64 count_before = 0, mass_before = 0, count_all = 0, mass_all = 0;
  BlockScan(scan).ExclusiveSum(count, count_before, count_all);
  __syncthreads();
  BlockScan(scan).ExclusiveSum(mass, mass_before, mass_all);
  if (threadIdx.x == 0) {
    s_bucket = -1;
    s_count_above = st.count_above;
    s_mass_above = st.mass_above;
    s_target = level == 0 ? search_target(q, p, st, mass_all) : st.target;
  }
  __syncthreads();
  const u64 target = s_target;
  const bool by_count = q.role == Role::TopK;
  auto reached = [&](u64 c, u64 m) { return by_count ? c >= target : m >= target; };
  // The running totals grow bucket by bucket, so exactly one thread sees them reach the target
  // inside its range (none has reached it at its start).
  u64 c = st.count_above + count_before, m = st.mass_above + mass_before;
  if (!reached(c, m)) {
    for (int i = 0; i < per; ++i) {
      const u64 cb = __ldcg(&s.count[bucket(i)]), mb = __ldcg(&s.mass[bucket(i)]);
      if (reached(c + cb, m + mb)) {
        s_bucket = bucket(i);
        s_count_above = c;
        s_mass_above = m;
        break;
      }
      c += cb;
      m += mb;
    }
  }
  __syncthreads();
  // Not found only with NaN logits: any bucket, the id stays in range.
  const int b = s_bucket < 0 ? 0 : s_bucket;
  if (level + 1 < kLevels) {
    if (threadIdx.x == 0) {
      st.prefix = level == 0 ? unsigned(b) : (st.prefix << bits) | unsigned(b);
      st.count_above = s_count_above;
      st.mass_above = s_mass_above;
      st.target = target;
    }
  } else if (threadIdx.x == 0) {
    // The exact logit: its tokens all weigh the same, so the rank of the token at the position
    // among them follows from the counts or masses.
    const u64 ties = __ldcg(&s.count[b]), tie_mass = __ldcg(&s.mass[b]);
    const u64 w = ties ? tie_mass / ties : 0;
    u64 r = 0;
    if (by_count)
      r = target - s_count_above - 1;
    else if (w > 0)
      r = (target - s_mass_above + w - 1) / w - 1;
    if (ties == 0 || r > ties - 1) r = ties ? ties - 1 : 0;
    const u64 through = s_mass_above + (r + 1) * w;  // mass up to the position, inclusive
    if (q.role == Role::TopK) st.z = through;
    if (q.role == Role::Nucleus) st.kept = through;
    s_rank = r;
    s_key = (st.prefix << bits) | unsigned(b);  // all 32 bits: the logit itself
    s_first = 0xffffffffu - __ldcg(&s.first[b]);
    st.prefix = 0;
    st.count_above = 0;
    st.mass_above = 0;
    st.target = 0;
  }
  __syncthreads();
  if (level + 1 == kLevels && q.role == Role::Pick) {
    const int32_t pick = s_rank == 0 ? int32_t(s_first) : nth_tie(x, n, s_key, s_rank);
    if (threadIdx.x == 0) {
      *id = pick >= 0 && pick < n ? pick : 0;
      st = State{};  // the op's last kernel: the scratch is all zero again
    }
  }
  for (int i = threadIdx.x; i < kBuckets; i += kSampleThreads) {
    s.count[i] = 0;
    s.mass[i] = 0;
    s.first[i] = 0;
  }
  if (threadIdx.x == 0) st.done = 0;
}

// One level of a search: histograms of the current bucket's tokens by the level's bits, in shared
// memory, then added into the global ones; the last block finishes the level.
__global__ void __launch_bounds__(kSampleThreads)
    sample_level_kernel(int32_t* id, Scratch s, const float* x, int64_t n, int level, Search q,
                        SampleLaunch p) {
  __shared__ u64 h_mass[kBuckets];
  __shared__ unsigned h_count[kBuckets], h_first[kBuckets];
  allow_dependents();
  wait_for_inputs();
  const int shift = level_shift(level), bits = level_bits(level), nb = 1 << bits;
  const bool last_level = level + 1 == kLevels;
  for (int b = threadIdx.x; b < nb; b += kSampleThreads) {
    h_mass[b] = 0;
    h_count[b] = 0;
    h_first[b] = 0;
  }
  __syncthreads();
  const unsigned prefix = s.state->prefix;
  const float m = key_value(s.state->max_key);
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t j = strided(i);
    if (j >= n) continue;
    const float v = x[j];
    const unsigned key = order_key(v);
    if (level > 0 && (key >> (shift + bits)) != prefix) continue;  // outside the current bucket
    const int b = int((key >> shift) & unsigned(nb - 1));
    atomicAdd(&h_count[b], 1u);
    const u64 w = token_mass(v, m, p.inv_temperature);
    if (w) atomicAdd(&h_mass[b], w);
    if (last_level) atomicMax(&h_first[b], 0xffffffffu - unsigned(j));
  }
  __syncthreads();
  for (int b = threadIdx.x; b < nb; b += kSampleThreads) {
    if (h_count[b] == 0) continue;
    atomicAdd(&s.count[b], h_count[b]);
    if (h_mass[b]) atomicAdd(&s.mass[b], h_mass[b]);
    if (last_level) atomicMax(&s.first[b], h_first[b]);
  }
  if (last_block(s.state)) finish_level(id, s, x, n, level, q, p);
}

// No cut: the pick walks the row in id order. Each block writes its slice's mass; the last block
// finds the slice where the running mass reaches the target, then the token inside it.
__global__ void __launch_bounds__(kSampleThreads)
    sample_in_id_order_kernel(int32_t* id, Scratch s, const float* x, int64_t n, SampleLaunch p) {
  __shared__ u64 red[32];
  __shared__ typename BlockScan::TempStorage scan;
  __shared__ int64_t s_block;
  __shared__ u64 s_above, s_target;
  allow_dependents();
  wait_for_inputs();
  const float m = key_value(s.state->max_key);
  u64 sum = 0;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t j = strided(i);
    if (j < n) sum += token_mass(x[j], m, p.inv_temperature);
  }
  sum = block_reduce(sum, 0ull, red, Sum{});
  if (threadIdx.x == 0) s.mass[blockIdx.x] = sum;
  if (!last_block(s.state)) return;
  // The slices in id order: thread t totals the consecutive slices [t * per, (t + 1) * per).
  const int blocks = int(gridDim.x), per = (blocks + kSampleThreads - 1) / kSampleThreads;
  const int first_slice = int(threadIdx.x) * per;
  u64 mine = 0, before = 0, total = 0;
  for (int i = 0; i < per; ++i)
    if (first_slice + i < blocks) mine += __ldcg(&s.mass[first_slice + i]);
  BlockScan(scan).ExclusiveSum(mine, before, total);
  const u64 t0 = u64(floor(p.u01 * double(total))) + 1, target = t0 > total ? total : t0;
  if (threadIdx.x == 0) {
    s_block = 0;
    s_above = 0;
    s_target = target;
  }
  __syncthreads();
  // The first slice whose running mass reaches the target (before < target <= before + mass).
  if (before < target && target <= before + mine) {
    u64 run = before;
    for (int i = 0; i < per && first_slice + i < blocks; ++i) {
      const u64 next = run + __ldcg(&s.mass[first_slice + i]);
      if (target <= next) {
        s_block = first_slice + i;
        s_above = run;
        break;
      }
      run = next;
    }
  }
  __syncthreads();
  // Inside the slice, thread t takes consecutive ids (the walk's order), recomputing the masses.
  const int64_t mine_first = s_block * kPerBlock + int64_t(threadIdx.x) * kPerThread;
  u64 w[kPerThread], wsum = 0;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t j = mine_first + i;
    w[i] = j < n ? token_mass(x[j], m, p.inv_temperature) : 0;
    wsum += w[i];
  }
  u64 wbefore = 0, wtotal = 0;
  BlockScan(scan).ExclusiveSum(wsum, wbefore, wtotal);
  u64 run = s_above + wbefore;
  if (run < s_target && s_target <= run + wsum) {
    for (int i = 0; i < kPerThread; ++i) {
      run += w[i];
      if (s_target <= run) {
        *id = int32_t(mine_first + i);
        break;
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < blocks; i += kSampleThreads) s.mass[i] = 0;
  if (threadIdx.x == 0) *s.state = State{};  // the op's last kernel: the scratch is zero again
}

}  // namespace

cudaError_t sample(int32_t* id, void* scratch, const float* x, int64_t n, const SampleLaunch& p) {
  if (n <= 0 || n > kSampleMaxN) return cudaErrorInvalidValue;
  auto* base = static_cast<unsigned char*>(scratch);
  const Scratch s{reinterpret_cast<State*>(base), reinterpret_cast<u64*>(base + 64),
                  reinterpret_cast<unsigned*>(base + 64 + kBuckets * 8),
                  reinterpret_cast<unsigned*>(base + 64 + kBuckets * 12)};
  static_assert(64 + kBuckets * 16 == kSampleScratchBytes, "the scratch's parts");
  const dim3 grid(unsigned((n + kPerBlock - 1) / kPerBlock)), block(kSampleThreads);
  cudaError_t e = launch_dependent(sample_max_kernel, grid, block, s, x, n);
  if (e != cudaSuccess) return e;
  const bool topk = p.top_k > 0 && p.top_k < n, nucleus = p.top_p < 1.0f;
  if (!topk && !nucleus)
    return launch_dependent(sample_in_id_order_kernel, grid, block, id, s, x, n, p);
  Search searches[3];
  int count = 0;
  if (topk) searches[count++] = {Role::TopK, false, false};
  if (nucleus) searches[count++] = {Role::Nucleus, topk, false};
  searches[count++] = {Role::Pick, topk, nucleus};
  for (int i = 0; i < count; ++i)
    for (int level = 0; level < kLevels; ++level)
      if ((e = launch_dependent(sample_level_kernel, grid, block, id, s, x, n, level, searches[i],
                                p)) != cudaSuccess)
        return e;
  return cudaSuccess;
}

}  // namespace moekit::cuda
