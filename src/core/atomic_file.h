// AtomicFile: writes a file so that readers see either the old content or the complete new one:
// data goes to a temp file in the same folder, then fsync, rename over the target, fsync the
// folder. On any failure (disk full included) the temp file is removed and the target is left
// untouched.
#pragma once

#include <filesystem>
#include <string>

namespace moekit {

class AtomicFile {
 public:
  explicit AtomicFile(std::filesystem::path target);
  ~AtomicFile();  // removes the temp file unless commit() succeeded
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, size_t n);
  void commit();

 private:
  void abandon();
  std::filesystem::path target_, tmp_;
  int fd_ = -1;
  bool committed_ = false;
};

// Whole-file convenience.
void write_file_atomic(const std::filesystem::path& path, const std::string& text);

}  // namespace moekit
