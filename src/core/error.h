// moekit::Error: the one exception type for bad input and failed IO.
// Its message is a single line that names the file (and tensor or field) and the problem; the CLI
// prints it and exits with status 2. Programming errors use MOEKIT_CHECK (also an Error, so a
// broken invariant still ends in one line instead of an abort).
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace moekit {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw Error(fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace moekit

#define MOEKIT_CHECK(cond, ...)                                                \
  do {                                                                         \
    if (!(cond))                                                               \
      ::moekit::fail("internal check failed at {}:{}: {}", __FILE__, __LINE__, \
                     ::fmt::format(__VA_ARGS__));                              \
  } while (0)
