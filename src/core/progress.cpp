// Terminal progress bar / plain progress lines.
#include "core/progress.h"

#include <fmt/format.h>
#include <unistd.h>

#include <cctype>
#include <cstdio>

namespace moekit {

Progress::Progress(std::string label, int64_t total, std::string unit)
    : label_(std::move(label)), unit_(std::move(unit)), total_(total), tty_(::isatty(1) != 0) {
  start_ = last_print_ = std::chrono::steady_clock::now();
}

static std::string fmt_seconds(double s) {
  if (s < 0 || s > 1e7) return "?";
  int t = int(s + 0.5);
  return t >= 3600 ? fmt::format("{}h{:02}m", t / 3600, (t / 60) % 60)
                   : fmt::format("{}:{:02}", t / 60, t % 60);
}

// "steps/s" for a word counted one per step; symbols ("MiB") and scaled units stay as given.
static std::string rate_unit(const std::string& unit, double units_per_step) {
  const bool word = !unit.empty() && std::islower(static_cast<unsigned char>(unit[0]));
  return units_per_step == 1.0 && word ? unit + "s" : unit;
}

void Progress::update(int64_t done, const std::string& note, double units_per_step) {
  auto now = std::chrono::steady_clock::now();
  if (start_done_ < 0) {
    start_done_ = done > 0 ? done - 1 : 0;
    start_ = now;
  }
  double elapsed = std::chrono::duration<double>(now - start_).count();
  double rate = elapsed > 0 ? double(done - start_done_) / elapsed : 0.0;
  double eta = rate > 0 ? double(total_ - done) / rate : -1.0;
  if (tty_) {
    if (done < total_ && std::chrono::duration<double>(now - last_print_).count() < 0.1) return;
    last_print_ = now;
    const int width = 30;
    int filled = total_ > 0 ? int(double(width) * double(done) / double(total_)) : 0;
    std::string bar(size_t(filled), '#');
    bar.resize(size_t(width), '.');
    fmt::print("\r{} [{}] {}/{} {:.2f} {}/s ETA {} {}\x1b[K", label_, bar, done, total_,
               rate * units_per_step, rate_unit(unit_, units_per_step), fmt_seconds(eta), note);
    std::fflush(stdout);
  } else if (done == total_ || (plain_every_ > 0 && done % plain_every_ == 0)) {
    fmt::print("{} {}/{} ({:.2f} {}/s, ETA {}) {}\n", label_, done, total_, rate * units_per_step,
               rate_unit(unit_, units_per_step), fmt_seconds(eta), note);
    std::fflush(stdout);
  }
}

void Progress::finish(const std::string& note) {
  double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  if (tty_) fmt::print("\n");
  fmt::print("{} done in {} {}\n", label_, fmt_seconds(elapsed), note);
  std::fflush(stdout);
}

}  // namespace moekit
