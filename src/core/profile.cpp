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
  int64_t roundings = 0;  // F32 -> BF16 conversion passes run inside the step
  int64_t rounded = 0;    // their elements
};

thread_local const char* current_step = nullptr;  // innermost open step of this thread

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
  if (!opened_) outer_ = current_step;
  opened_ = true;
  current_step = name;
  unwinding_ = std::uncaught_exceptions();
  t0_ = std::chrono::steady_clock::now();
}

void ProfileSteps::end() {
  if (!name_) return;
  const char* name = name_;
  name_ = nullptr;
  current_step = outer_;
  const size_t peak = be_->close_memory_window();
  if (std::uncaught_exceptions() > unwinding_) return;
  be_->synchronize();
  record(name, t0_, peak);
}

void profile_count_rounding(int64_t n) {
  if (!profiling()) return;
  std::lock_guard<std::mutex> lock(table().mu);
  Entry& e = table().entries[current_step ? current_step : "(outside any step)"];
  ++e.roundings;
  e.rounded += n;
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
  for (const auto& [name, e] : rows) {
    out += fmt::format("{}: {:.1f} ms ({} calls)", name, e.seconds * 1e3, e.calls);
    if (e.peak_bytes > 0) out += fmt::format(", peak {:.2f} GiB", double(e.peak_bytes) / (1 << 30));
    if (e.roundings > 0)
      out += fmt::format(", {} bf16 roundings of {:.1f} M elements", e.roundings,
                         double(e.rounded) / 1e6);
    out += "\n";
  }
  return out;
}

}  // namespace moekit
