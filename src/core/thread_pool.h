// ThreadPool: a fixed set of workers for the CPU backend's loops (attention, norms, routing).
// parallel_for splits [0, n) into one contiguous chunk per worker, always the same way for the
// same n and thread count, so each output is written by one thread in one order: results are
// bit-identical run to run (the basis of exact training resume).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace moekit {

class ThreadPool {
 public:
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return int(workers_.size()) + 1; }
  // fn(begin, end) over chunks of [0, n); runs inline when n is small or the pool has one thread.
  void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn, int64_t grain = 1);

 private:
  void worker(int index);

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable start_cv_, done_cv_;
  const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  int64_t job_n_ = 0;
  int64_t generation_ = 0;
  int pending_ = 0;
  int active_chunks_ = 0;
  bool stop_ = false;
};

// The process-wide pool used by the CPU backend; sized once at start-up (set_num_threads).
ThreadPool& cpu_pool();
// Sets the CPU thread count for moekit's pool and OpenBLAS. 0 = all hardware threads.
void set_num_threads(int n);
int num_threads();

}  // namespace moekit
