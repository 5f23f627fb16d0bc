#include "darwin/client.hpp"

#include <xpc/xpc.h>

#include <cerrno>
#include <utility>

#include "common/sys_error.hpp"
#include "darwin/error.hpp"

namespace vmb {

XpcClient::XpcClient(std::string service_name, bool privileged) : service_name_(std::move(service_name)) {
  std::uint64_t flags = privileged ? XPC_CONNECTION_MACH_SERVICE_PRIVILEGED : 0;
  xpc_connection_t connection = xpc_connection_create_mach_service(service_name_.c_str(), queue_.get(), flags);
  if (connection == nullptr) throw SysError(EIO, "xpc_connection_create_mach_service", service_name_);
  connection_ = XpcConnection::adopt(connection);
  // XPC requires a handler before activation.  Replies come back through
  // send(); errors worth reporting come back there too, so events are
  // ignored.
  xpc_connection_set_event_handler(connection, ^(xpc_object_t) {
  });
  xpc_connection_activate(connection);
}

Value XpcClient::send(const ValueMap& message, const std::vector<std::string>& opaque_keys) {
  constexpr const char* operation = "xpc_connection_send_message_with_reply_sync";
  XpcObject request = to_xpc(Value{message});
  XpcConnection connection;  // our own reference: close() may run meanwhile
  {
    std::lock_guard<std::mutex> lock(mutex_);
    connection = connection_;
  }
  if (!connection) throw SysError(EBADF, operation, service_name_);
  XpcObject reply = XpcObject::adopt(xpc_connection_send_message_with_reply_sync(connection.get(), request.get()));
  if (xpc_get_type(reply.get()) == XPC_TYPE_ERROR) throw XpcError(operation, xpc_error_description(reply.get()));
  return from_xpc(reply.get(), opaque_keys);
}

void XpcClient::close() noexcept {
  XpcConnection connection;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    connection = std::move(connection_);
  }
  if (connection) xpc_connection_cancel(connection.get());
}

}  // namespace vmb
