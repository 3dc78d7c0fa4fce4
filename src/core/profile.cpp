// ProfileScope bookkeeping.
#include "core/profile.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <map>
#include <mutex>
#include <vector>

#include "ops/ops.h"

namespace moekit {

namespace {

struct Entry {
  double seconds = 0;
  int64_t calls = 0;
  size_t peak_bytes = 0;  // most device memory held during any call
};

struct Table {
  std::mutex mu;
  std::map<std::string, Entry> entries;
};

Table& table() {
  static Table t;
  return t;
}

void record(const char* name, std::chrono::steady_clock::time_point t0, size_t peak) {
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::lock_guard<std::mutex> lock(table().mu);
  Entry& e = table().entries[name];
  e.seconds += s;
  ++e.calls;
  e.peak_bytes = std::max(e.peak_bytes, peak);
}

}  // namespace

bool profiling() {
  static const bool on = [] {
    const char* v = std::getenv("MOEKIT_PROFILE");
    return v && *v && std::string(v) != "0";
  }();
  return on;
}

void ProfileSteps::next(const char* name) {
  if (!profiling()) return;
  end();
  be_->synchronize();
  be_->open_memory_window();
  name_ = name;
  unwinding_ = std::uncaught_exceptions();
  t0_ = std::chrono::steady_clock::now();
}

void ProfileSteps::end() {
  if (!name_) return;
  const char* name = name_;
  name_ = nullptr;
  const size_t peak = be_->close_memory_window();
  if (std::uncaught_exceptions() > unwinding_) return;
  be_->synchronize();
  record(name, t0_, peak);
}

void profile_reset() {
  std::lock_guard<std::mutex> lock(table().mu);
  table().entries.clear();
}

std::string profile_report() {
  if (!profiling()) return "";
  std::lock_guard<std::mutex> lock(table().mu);
  std::vector<std::pair<std::string, Entry>> rows(table().entries.begin(), table().entries.end());
  std::sort(rows.begin(), rows.end(),
            [](const auto& a, const auto& b) { return a.second.seconds > b.second.seconds; });
  std::string out;
  for (const auto& [name, e] : rows)
    out += e.peak_bytes > 0
               ? fmt::format("{}: {:.1f} ms ({} calls), peak {:.2f} GiB\n", name, e.seconds * 1e3,
                             e.calls, double(e.peak_bytes) / double(1 << 30))
               : fmt::format("{}: {:.1f} ms ({} calls)\n", name, e.seconds * 1e3, e.calls);
  return out;
}

}  // namespace moekit
