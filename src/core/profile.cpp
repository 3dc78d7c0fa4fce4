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
};

struct Table {
  std::mutex mu;
  std::map<std::string, Entry> entries;
};

Table& table() {
  static Table t;
  return t;
}

void record(const char* name, std::chrono::steady_clock::time_point t0) {
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::lock_guard<std::mutex> lock(table().mu);
  Entry& e = table().entries[name];
  e.seconds += s;
  ++e.calls;
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
  name_ = name;
  unwinding_ = std::uncaught_exceptions();
  t0_ = std::chrono::steady_clock::now();
}

void ProfileSteps::end() {
  if (!name_) return;
  const char* name = name_;
  name_ = nullptr;
  if (std::uncaught_exceptions() > unwinding_) return;
  be_->synchronize();
  record(name, t0_);
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
    out += fmt::format("{}: {:.1f} ms ({} calls)\n", name, e.seconds * 1e3, e.calls);
  return out;
}

}  // namespace moekit
