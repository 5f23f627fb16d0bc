// Errors of the macOS mechanism besides SysError (errno) and VmnetError
// (vmnet.hpp).  module_darwin.cpp maps each to one Python exception.
#pragma once

#include <stdexcept>
#include <string>

namespace vmb {

// A value that cannot cross between Python and XPC: an unsupported type,
// content beyond the depth or size limit, a NUL in a string, an int outside
// int64, an unparsable address.  Python: ValueError.
class InvalidValue : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// XPC answered with an error object instead of a reply.  Python: XpcError
// (a ConnectionError).
class XpcError : public std::runtime_error {
 public:
  XpcError(const std::string& operation, std::string description)
      : std::runtime_error(operation + ": " + description), description_(std::move(description)) {}

  // XPC_ERROR_KEY_DESCRIPTION of the error ("Connection invalid", ...).
  const std::string& description() const noexcept { return description_; }

 private:
  std::string description_;
};

}  // namespace vmb
