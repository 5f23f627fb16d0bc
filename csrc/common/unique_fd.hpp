// Move-only owner of one file descriptor.
#pragma once

#include <cerrno>
#include <unistd.h>

namespace vmb {

class UniqueFd {
 public:
  UniqueFd() noexcept = default;
  explicit UniqueFd(int fd) noexcept : fd_(fd) {}
  ~UniqueFd() { reset(); }

  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  UniqueFd(UniqueFd&& other) noexcept : fd_(other.release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) reset(other.release());
    return *this;
  }

  int get() const noexcept { return fd_; }
  explicit operator bool() const noexcept { return fd_ >= 0; }

  // Hands the fd on; the caller now owns it.
  int release() noexcept {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }

  // Keeps errno: reset() often runs on an error path that reports errno next.
  // A failed close() still frees the fd on Linux, so it is not retried.
  void reset(int fd = -1) noexcept {
    if (fd_ >= 0) {
      int saved = errno;
      ::close(fd_);
      errno = saved;
    }
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

}  // namespace vmb
