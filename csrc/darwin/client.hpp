// The client's side of the broker's transport: one connection to a Mach
// service, one synchronous request at a time per call.
#pragma once

#include <mutex>
#include <string>
#include <vector>

#include "darwin/queue.hpp"
#include "darwin/value.hpp"

namespace vmb {

class XpcClient {
 public:
  // Connecting is lazy in XPC: a missing service shows up as an XpcError
  // on the first send.  `privileged` limits the lookup to system daemons.
  XpcClient(std::string service_name, bool privileged);
  ~XpcClient() { close(); }

  XpcClient(const XpcClient&) = delete;
  XpcClient& operator=(const XpcClient&) = delete;

  // Sends `message` and waits for the reply.  In a dictionary reply the
  // values of `opaque_keys` stay XpcObjects (see from_xpc).  XpcError when
  // XPC answers with an error object; InvalidValue if `message` or the
  // reply is beyond the conversion limits; SysError(EBADF) after close().
  Value send(const ValueMap& message, const std::vector<std::string>& opaque_keys);
  // Cancels the connection; a send() in flight returns an XpcError.
  // Idempotent.
  void close() noexcept;

 private:
  std::string service_name_;
  SerialQueue queue_{"vmnet_broker.xpc_client"};
  std::mutex mutex_;  // guards connection_ against close() from another thread
  XpcConnection connection_;
};

}  // namespace vmb
