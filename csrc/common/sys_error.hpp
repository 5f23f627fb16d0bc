// The one error type of the mechanism: errno, the operation, the object.
#pragma once

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>

namespace vmb {

class SysError : public std::runtime_error {
 public:
  // `detail` is extra text from the kernel (a netlink extended ACK message).
  SysError(int code, std::string operation, std::string name = {}, std::string detail = {})
      : std::runtime_error(format(code, operation, detail)),
        code_(code),
        operation_(std::move(operation)),
        name_(std::move(name)) {}

  int code() const noexcept { return code_; }
  const std::string& operation() const noexcept { return operation_; }
  // The object the operation was about (link name, path); may be empty.
  const std::string& name() const noexcept { return name_; }

 private:
  static std::string format(int code, const std::string& operation, const std::string& detail) {
    std::string text = operation + ": " + std::strerror(code);
    if (!detail.empty()) text += " (" + detail + ")";
    return text;
  }

  int code_;
  std::string operation_;
  std::string name_;
};

// Throws SysError from the current errno.
[[noreturn]] inline void throw_errno(const std::string& operation, const std::string& name = {}) {
  throw SysError(errno, operation, name);
}

}  // namespace vmb
