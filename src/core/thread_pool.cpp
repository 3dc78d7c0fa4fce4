// ThreadPool implementation and the CPU thread-count setting shared with OpenBLAS.
#include "core/thread_pool.h"

#include <algorithm>
#include <memory>

extern "C" void openblas_set_num_threads(int num_threads);

namespace moekit {

ThreadPool::ThreadPool(int threads) {
  for (int i = 1; i < std::max(threads, 1); ++i) workers_.emplace_back([this, i] { worker(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard lk(mu_);
    stop_ = true;
  }
  start_cv_.notify_all();
  for (auto& t : workers_) t.join();
}

static void run_chunk(const std::function<void(int64_t, int64_t)>& fn, int64_t n, int chunks,
                      int index) {
  int64_t begin = n * index / chunks, end = n * (index + 1) / chunks;
  if (begin < end) fn(begin, end);
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn,
                              int64_t grain) {
  if (n <= 0) return;
  int chunks = int(std::min<int64_t>(size(), (n + grain - 1) / std::max<int64_t>(grain, 1)));
  if (chunks <= 1) {
    fn(0, n);
    return;
  }
  {
    std::lock_guard lk(mu_);
    job_ = &fn;
    job_n_ = n;
    active_chunks_ = chunks;
    pending_ = chunks - 1;
    ++generation_;
  }
  start_cv_.notify_all();
  run_chunk(fn, n, chunks, 0);
  std::unique_lock lk(mu_);
  done_cv_.wait(lk, [this] { return pending_ == 0; });
  job_ = nullptr;
}

void ThreadPool::worker(int index) {
  int64_t seen = 0;
  for (;;) {
    const std::function<void(int64_t, int64_t)>* job;
    int64_t n;
    int chunks;
    {
      std::unique_lock lk(mu_);
      start_cv_.wait(lk, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      job = job_;
      n = job_n_;
      chunks = active_chunks_;
    }
    if (index < chunks) {
      run_chunk(*job, n, chunks, index);
      std::lock_guard lk(mu_);
      if (--pending_ == 0) done_cv_.notify_one();
    }
  }
}

namespace {
struct PoolHolder {
  std::unique_ptr<ThreadPool> pool;
  int threads = 0;
};
PoolHolder& holder() {
  static PoolHolder h;
  return h;
}
}  // namespace

void set_num_threads(int n) {
  if (n <= 0) n = int(std::max(1u, std::thread::hardware_concurrency()));
  auto& h = holder();
  if (h.pool && h.threads == n) return;
  h.pool = std::make_unique<ThreadPool>(n);
  h.threads = n;
  openblas_set_num_threads(n);
}

ThreadPool& cpu_pool() {
  auto& h = holder();
  if (!h.pool) set_num_threads(0);
  return *h.pool;
}

int num_threads() {
  return cpu_pool().size();
}

}  // namespace moekit
