#include "darwin/listener.hpp"

#include <fcntl.h>
#include <unistd.h>
#include <xpc/xpc.h>

#include <cerrno>
#include <deque>
#include <map>
#include <mutex>
#include <utility>

#include "common/sys_error.hpp"
#include "common/unique_fd.hpp"
#include "darwin/error.hpp"
#include "darwin/queue.hpp"

namespace vmb {

namespace {

struct Peer {
  XpcConnection connection;  // retained: XPC hands peers to the handler borrowed
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
};

// A request kept for a later reply: the request dictionary (its reply
// context) and the connection to send the reply on.
struct Pending {
  XpcObject request;
  XpcConnection connection;
  std::uint64_t peer = 0;
};

void set_flags(int fd) {
  int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) throw_errno("fcntl O_NONBLOCK");
  if (::fcntl(fd, F_SETFD, FD_CLOEXEC) < 0) throw_errno("fcntl FD_CLOEXEC");
}

}  // namespace

// Everything the handler blocks reach.  They hold it by shared_ptr because
// XPC may deliver a cancelled connection's last event after close() and
// even after the XpcListener is gone; `closed` tells them to do nothing.
struct ListenerState {
  SerialQueue queue{"vmnet_broker.xpc_listener"};

  std::mutex mutex;  // guards everything below; never held across a wait
  bool closed = false;
  XpcConnection listener;
  UniqueFd read_end;
  UniqueFd write_end;
  std::deque<XpcEvent> events;
  std::map<std::uint64_t, Peer> peers;
  std::map<std::uint64_t, Pending> pending;
  std::uint64_t next_peer = 1;
  std::uint64_t next_request = 1;

  // Caller holds `mutex`.  The pipe holds a byte exactly while `events` is
  // non-empty: written on the first event, read by drain().
  void push(XpcEvent event) {
    bool was_empty = events.empty();
    events.push_back(std::move(event));
    if (!was_empty || !write_end) return;
    ssize_t n;
    do {
      n = ::write(write_end.get(), "e", 1);
    } while (n < 0 && errno == EINTR);
    // EAGAIN cannot happen with at most one byte waiting; any other error
    // leaves the events queued for the next drain() all the same.
  }

  // Fills an event's peer fields; caller holds `mutex`.
  static XpcEvent event_for(const char* kind, std::uint64_t id, const Peer& peer) {
    XpcEvent event;
    event.kind = kind;
    event.peer = id;
    event.pid = peer.pid;
    event.uid = peer.uid;
    event.gid = peer.gid;
    return event;
  }
};

namespace {

void on_peer_event(const std::shared_ptr<ListenerState>& state, std::uint64_t id, xpc_object_t event) noexcept;

// A new peer: it gets an id, our queue and a handler, and is activated, all
// under the mutex so close() either sees it in `peers` or it sees `closed`.
void accept_peer(const std::shared_ptr<ListenerState>& state, xpc_connection_t connection) {
  Peer peer{XpcConnection::retain(connection), xpc_connection_get_pid(connection),
            xpc_connection_get_euid(connection), xpc_connection_get_egid(connection)};
  std::lock_guard<std::mutex> lock(state->mutex);
  if (state->closed) {
    xpc_connection_cancel(connection);  // refused: a peer needs a handler or a cancel
    return;
  }
  std::uint64_t id = state->next_peer++;
  auto& entry = state->peers.emplace(id, std::move(peer)).first->second;
  XpcEvent event = ListenerState::event_for("peer", id, entry);
  std::shared_ptr<ListenerState> shared = state;  // the block keeps a copy
  xpc_connection_set_target_queue(connection, state->queue.get());
  xpc_connection_set_event_handler(connection, ^(xpc_object_t e) {
    on_peer_event(shared, id, e);
  });
  xpc_connection_activate(connection);
  state->push(std::move(event));
}

void on_listener_event(const std::shared_ptr<ListenerState>& state, xpc_object_t event) noexcept {
  try {
    if (xpc_get_type(event) == XPC_TYPE_CONNECTION) {
      accept_peer(state, static_cast<xpc_connection_t>(event));
      return;
    }
    XpcEvent e;
    e.kind = event == XPC_ERROR_TERMINATION_IMMINENT ? "terminating" : "error";
    e.description = xpc_get_type(event) == XPC_TYPE_ERROR ? xpc_error_description(event) : xpc_description(event);
    std::lock_guard<std::mutex> lock(state->mutex);
    if (!state->closed) state->push(std::move(e));  // after close(), INVALID is our own cancel
  } catch (...) {
    // Only allocation can fail here, and there is nobody to tell: the
    // exception must not reach libdispatch.  A peer Python never heard of
    // is cancelled, not left unactivated (undefined in XPC) or served by
    // nobody; its "gone" is then for a peer Python ignores.
    if (xpc_get_type(event) == XPC_TYPE_CONNECTION) xpc_connection_cancel(static_cast<xpc_connection_t>(event));
  }
}

void on_request(const std::shared_ptr<ListenerState>& state, std::uint64_t id, xpc_object_t request) {
  ValueMap message;
  std::string invalid;
  try {
    message = std::get<ValueMap>(from_xpc(request).data);
  } catch (const InvalidValue& e) {
    invalid = e.what();
  }
  std::lock_guard<std::mutex> lock(state->mutex);
  auto peer = state->peers.find(id);
  if (state->closed || peer == state->peers.end()) return;
  std::uint64_t request_id = state->next_request++;
  state->pending.emplace(request_id, Pending{XpcObject::retain(request), peer->second.connection, id});
  XpcEvent event = ListenerState::event_for("request", id, peer->second);
  event.request = request_id;
  event.message = std::move(message);
  event.invalid = std::move(invalid);
  state->push(std::move(event));
}

void on_gone(const std::shared_ptr<ListenerState>& state, std::uint64_t id) {
  // Declared before the lock: the references are released after unlocking.
  Peer gone;
  std::vector<Pending> dropped;
  std::lock_guard<std::mutex> lock(state->mutex);
  auto peer = state->peers.find(id);
  if (state->closed || peer == state->peers.end()) return;
  gone = std::move(peer->second);
  state->peers.erase(peer);
  // Its requests can no longer be answered: reply() says False for them.
  for (auto it = state->pending.begin(); it != state->pending.end();) {
    if (it->second.peer == id) {
      dropped.push_back(std::move(it->second));
      it = state->pending.erase(it);
    } else {
      ++it;
    }
  }
  state->push(ListenerState::event_for("gone", id, gone));
}

void on_peer_event(const std::shared_ptr<ListenerState>& state, std::uint64_t id, xpc_object_t event) noexcept {
  try {
    if (xpc_get_type(event) == XPC_TYPE_DICTIONARY) {
      on_request(state, id, event);
      return;
    }
    if (event == XPC_ERROR_CONNECTION_INVALID) {
      on_gone(state, id);
      return;
    }
    // INTERRUPTED, TERMINATION_IMMINENT, or a type a peer cannot send.
    std::string description =
        xpc_get_type(event) == XPC_TYPE_ERROR ? xpc_error_description(event) : "unexpected " + xpc_type_name(event);
    std::lock_guard<std::mutex> lock(state->mutex);
    auto peer = state->peers.find(id);
    if (state->closed || peer == state->peers.end()) return;
    XpcEvent e = ListenerState::event_for(event == XPC_ERROR_TERMINATION_IMMINENT ? "terminating" : "error", id,
                                          peer->second);
    e.description = std::move(description);
    state->push(std::move(e));
  } catch (...) {
    // Allocation failed; the exception must not reach libdispatch.  A
    // request dropped here is released unanswered.
  }
}

}  // namespace

XpcListener::XpcListener(std::string service_name)
    : service_name_(std::move(service_name)), state_(std::make_shared<ListenerState>()) {
  // No pipe2() on macOS: the flags follow in fcntl.
  int fds[2];
  if (::pipe(fds) < 0) throw_errno("pipe");
  state_->read_end = UniqueFd(fds[0]);
  state_->write_end = UniqueFd(fds[1]);
  set_flags(fds[0]);
  set_flags(fds[1]);

  xpc_connection_t listener = xpc_connection_create_mach_service(service_name_.c_str(), state_->queue.get(),
                                                                 XPC_CONNECTION_MACH_SERVICE_LISTENER);
  // XPC gives no reason; registration problems arrive later as an "error" event.
  if (listener == nullptr) throw SysError(EIO, "xpc_connection_create_mach_service", service_name_);
  state_->listener = XpcConnection::adopt(listener);
  std::shared_ptr<ListenerState> shared = state_;  // the block keeps a copy
  xpc_connection_set_event_handler(listener, ^(xpc_object_t event) {
    on_listener_event(shared, event);
  });
  xpc_connection_activate(listener);
}

int XpcListener::fileno() const noexcept {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->read_end.get();
}

std::vector<XpcEvent> XpcListener::drain() {
  std::lock_guard<std::mutex> lock(state_->mutex);
  if (state_->read_end) {
    char buf[64];
    ssize_t n;
    do {
      n = ::read(state_->read_end.get(), buf, sizeof buf);
    } while (n > 0 || (n < 0 && errno == EINTR));
  }
  std::vector<XpcEvent> out;
  out.reserve(state_->events.size());
  for (XpcEvent& event : state_->events) out.push_back(std::move(event));
  state_->events.clear();
  return out;
}

bool XpcListener::reply(std::uint64_t request, const ValueMap& message) {
  // Converted first: a message that cannot be sent leaves the request
  // pending, and create_reply works only once.
  XpcObject body = to_xpc(Value{message});
  Pending pending;
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    auto it = state_->pending.find(request);
    if (it == state_->pending.end()) return false;
    pending = std::move(it->second);
    state_->pending.erase(it);
  }
  XpcObject reply = XpcObject::adopt(xpc_dictionary_create_reply(pending.request.get()));
  if (!reply) return false;  // the peer sent no reply context
  xpc_object_t target = reply.get();
  xpc_dictionary_apply(body.get(), ^bool(const char* key, xpc_object_t value) {
    xpc_dictionary_set_value(target, key, value);  // retains value
    return true;
  });
  xpc_connection_send_message(pending.connection.get(), reply.get());
  return true;
}

void XpcListener::discard(std::uint64_t request) {
  Pending dropped;  // released after unlocking
  std::lock_guard<std::mutex> lock(state_->mutex);
  auto it = state_->pending.find(request);
  if (it == state_->pending.end()) return;
  dropped = std::move(it->second);
  state_->pending.erase(it);
}

void XpcListener::cancel_peer(std::uint64_t peer) {
  XpcConnection connection;
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    auto it = state_->peers.find(peer);
    if (it == state_->peers.end()) return;
    connection = it->second.connection;
  }
  // Stays in `peers` until its INVALID event: "gone" is reported there.
  xpc_connection_cancel(connection.get());
}

void XpcListener::close() {
  XpcConnection listener;
  std::map<std::uint64_t, Peer> peers;
  std::map<std::uint64_t, Pending> pending;
  std::deque<XpcEvent> events;
  UniqueFd read_end, write_end;
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    if (state_->closed) return;
    state_->closed = true;
    listener = std::move(state_->listener);
    peers.swap(state_->peers);
    pending.swap(state_->pending);
    events.swap(state_->events);
    read_end = std::move(state_->read_end);
    write_end = std::move(state_->write_end);
  }
  if (listener) xpc_connection_cancel(listener.get());
  for (auto& [id, peer] : peers) xpc_connection_cancel(peer.connection.get());
  pending.clear();  // ends each request's transaction unanswered
  // Handlers already running finish before close() returns; later ones see
  // `closed`.  On the queue itself (a handler cannot call this, but a
  // destructor might run there) barrier() does not wait.
  state_->queue.barrier();
}

}  // namespace vmb
