// Atomic file replacement.
#include "core/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "core/error.h"

namespace moekit {

AtomicFile::AtomicFile(std::filesystem::path target) : target_(std::move(target)) {
  tmp_ = target_;
  tmp_ += fmt::format(".tmp.{}", ::getpid());
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) fail("{}: cannot create ({})", target_.string(), std::strerror(errno));
}

AtomicFile::~AtomicFile() {
  if (!committed_) abandon();
}

void AtomicFile::abandon() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  ::unlink(tmp_.c_str());
}

void AtomicFile::write(const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd_, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      int err = w < 0 ? errno : ENOSPC;
      abandon();
      fail("{}: write failed ({}); the previous file is unchanged", target_.string(),
           std::strerror(err));
    }
    p += w;
    n -= size_t(w);
  }
}

void AtomicFile::commit() {
  if (::fsync(fd_) != 0 || ::close(fd_) != 0) {
    int err = errno;
    fd_ = -1;
    abandon();
    fail("{}: fsync failed ({}); the previous file is unchanged", target_.string(),
         std::strerror(err));
  }
  fd_ = -1;
  if (std::rename(tmp_.c_str(), target_.c_str()) != 0) {
    int err = errno;
    abandon();
    fail("{}: rename failed ({})", target_.string(), std::strerror(err));
  }
  committed_ = true;
  auto dir = target_.parent_path().empty() ? std::filesystem::path(".") : target_.parent_path();
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

void write_file_atomic(const std::filesystem::path& path, const std::string& text) {
  AtomicFile f(path);
  f.write(text.data(), text.size());
  f.commit();
}

}  // namespace moekit
