// Kernel time per name for any CUDA process, without a profiler binary: a CUPTI activity tracer
// loaded by the CUDA driver through CUDA_INJECTION64_PATH (the lent GPU machines have no nsys).
// At exit it prints, per kernel name (demangled, template arguments kept), the GPU time, the
// launch count and the mean, largest first, plus memcpy/memset totals; to stderr or to the file
// named by KERNEL_TRACE_OUT. KERNEL_TRACE_SKIP_US=N ignores activity in the first N microseconds
// after the first kernel (warm-up). KERNEL_TRACE_TIMELINE=PATH also writes every record (start
// and end in microseconds after the first, kind, name) in timeline order, to find the GPU's idle
// gaps and the kernels of one step.
//   nvcc -O2 -shared -Xcompiler -fPIC tools/kernel_trace.cpp -o /tmp/libkernel_trace.so -lcupti
//   CUDA_INJECTION64_PATH=/tmp/libkernel_trace.so ./build/bench/moekit_model_bench ...
// A diagnostic tool run on the device (tools/device_run.sh trace), not part of moekit.
#include <cupti.h>
#include <cxxabi.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace {

struct Stat {
  uint64_t ns = 0, count = 0;
};

std::mutex mu;
std::map<std::string, Stat> kernels;
Stat memcpys, memsets;
uint64_t first_start = 0, skip_ns = 0, window_start = UINT64_MAX, window_end = 0;
struct Event {
  uint64_t start, end;
  std::string what;
};
std::vector<Event> timeline;
bool keep_timeline = false;

std::string demangle(const char* name) {
  int status = 0;
  char* d = abi::__cxa_demangle(name, nullptr, nullptr, &status);
  std::string s = status == 0 && d ? d : name;
  std::free(d);
  return s;
}

bool counted(uint64_t start, uint64_t end) {
  if (first_start == 0) first_start = start;
  if (start < first_start + skip_ns) return false;
  window_start = std::min(window_start, start);
  window_end = std::max(window_end, end);
  return true;
}

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *size = 8 << 20;
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, *size));
  *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  CUpti_Activity* record = nullptr;
  std::lock_guard<std::mutex> lock(mu);
  while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    if (record->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL ||
        record->kind == CUPTI_ACTIVITY_KIND_KERNEL) {
      const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(record);
      if (!counted(k->start, k->end)) continue;
      const std::string name = demangle(k->name);
      Stat& s = kernels[name];
      s.ns += k->end - k->start;
      ++s.count;
      if (keep_timeline) timeline.push_back({k->start, k->end, "K " + name.substr(0, 110)});
    } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
      const auto* m = reinterpret_cast<const CUpti_ActivityMemcpy6*>(record);
      if (!counted(m->start, m->end)) continue;
      memcpys.ns += m->end - m->start;
      ++memcpys.count;
      if (keep_timeline)
        timeline.push_back(
            {m->start, m->end,
             "C kind " + std::to_string(m->copyKind) + " " + std::to_string(m->bytes) + " bytes"});
    } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
      const auto* m = reinterpret_cast<const CUpti_ActivityMemset4*>(record);
      if (!counted(m->start, m->end)) continue;
      memsets.ns += m->end - m->start;
      ++memsets.count;
    }
  }
  std::free(buffer);
}

void report() {
  cuptiActivityFlushAll(1);
  std::lock_guard<std::mutex> lock(mu);
  std::vector<std::pair<std::string, Stat>> rows(kernels.begin(), kernels.end());
  std::sort(rows.begin(), rows.end(),
            [](const auto& a, const auto& b) { return a.second.ns > b.second.ns; });
  uint64_t total = 0, launches = 0;
  for (const auto& [name, s] : rows) {
    total += s.ns;
    launches += s.count;
  }
  const char* path = std::getenv("KERNEL_TRACE_OUT");
  FILE* out = path ? std::fopen(path, "w") : stderr;
  if (!out) out = stderr;
  const double wall = window_end > window_start ? double(window_end - window_start) : 0.0;
  std::fprintf(out,
               "# kernel trace: %.3f ms in %llu kernels over %.3f ms of GPU timeline (%.0f%% busy);"
               " memcpy %.3f ms (%llu), memset %.3f ms (%llu)\n",
               double(total) / 1e6, (unsigned long long)launches, wall / 1e6,
               wall > 0 ? 100.0 * double(total) / wall : 0.0, double(memcpys.ns) / 1e6,
               (unsigned long long)memcpys.count, double(memsets.ns) / 1e6,
               (unsigned long long)memsets.count);
  std::fprintf(out, "# total_ms  share  count  mean_us  kernel\n");
  for (const auto& [name, s] : rows) {
    std::string n = name.size() > 150 ? name.substr(0, 150) + "..." : name;
    std::fprintf(out, "%9.3f %5.1f%% %6llu %8.2f  %s\n", double(s.ns) / 1e6,
                 total ? 100.0 * double(s.ns) / double(total) : 0.0, (unsigned long long)s.count,
                 double(s.ns) / double(s.count) / 1e3, n.c_str());
  }
  if (out != stderr) std::fclose(out);
  if (const char* tpath = std::getenv("KERNEL_TRACE_TIMELINE"); tpath && !timeline.empty()) {
    std::sort(timeline.begin(), timeline.end(),
              [](const Event& a, const Event& b) { return a.start < b.start; });
    if (FILE* t = std::fopen(tpath, "w")) {
      const uint64_t t0 = timeline.front().start;
      for (const Event& e : timeline)
        std::fprintf(t, "%.1f %.1f %s\n", double(e.start - t0) / 1e3, double(e.end - t0) / 1e3,
                     e.what.c_str());
      std::fclose(t);
    }
  }
}

}  // namespace

extern "C" int InitializeInjection() {
  if (const char* skip = std::getenv("KERNEL_TRACE_SKIP_US"))
    skip_ns = std::strtoull(skip, nullptr, 10) * 1000;
  keep_timeline = std::getenv("KERNEL_TRACE_TIMELINE") != nullptr;
  cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
  std::atexit(report);
  return 1;
}
