// The broker's XPC transport: a Mach-service listener whose peers' events
// are queued for Python to drain.  The event handlers run on a private
// serial queue and never touch Python: they convert, queue, and write a
// byte to a pipe that the Python event loop watches.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "darwin/value.hpp"

namespace vmb {

struct XpcEvent {
  // "peer", "request", "gone", "error" or "terminating".
  std::string kind;
  // Listener-chosen id, never reused; 0 for the listener itself.
  std::uint64_t peer = 0;
  // The peer's credentials as read when it connected (also on its later
  // events, so every log line can name the pid).
  pid_t pid = 0;
  uid_t uid = 0;  // euid
  gid_t gid = 0;  // egid
  // Id of a "request" event, to reply to; 0 otherwise.
  std::uint64_t request = 0;
  // The request's dictionary as plain values; empty when it is beyond the
  // conversion limits, and then `invalid` says why, so policy can still
  // answer it (with "invalid request") without a key a peer could forge.
  ValueMap message;
  std::string invalid;
  // XPC_ERROR_KEY_DESCRIPTION of an "error" or "terminating" event.
  std::string description;
};

struct ListenerState;  // shared with the event handler blocks

class XpcListener {
 public:
  // Creates the XPC_CONNECTION_MACH_SERVICE_LISTENER connection on a
  // private serial queue and activates it.  SysError if the pipe or the
  // listener cannot be made.
  explicit XpcListener(std::string service_name);
  ~XpcListener() { close(); }

  XpcListener(const XpcListener&) = delete;
  XpcListener& operator=(const XpcListener&) = delete;

  const std::string& service_name() const noexcept { return service_name_; }
  // The pipe's read end: readable while events wait; -1 after close().
  int fileno() const noexcept;
  // Every queued event, oldest first; never blocks.
  std::vector<XpcEvent> drain();
  // Answers a request with xpc_dictionary_create_reply, filled from
  // `message`, sent on the peer's connection.  False if the request is
  // unknown, already answered, its peer gone, or it has no reply context.
  // InvalidValue if `message` cannot be converted: then nothing is sent and
  // the request stays pending.
  bool reply(std::uint64_t request, const ValueMap& message);
  // Drops a request unanswered.
  void discard(std::uint64_t request);
  // Cancels a peer's connection; its "gone" event follows.
  void cancel_peer(std::uint64_t peer);
  // Cancels the listener and every peer, releases every pending request,
  // closes the pipe, and waits for handlers already running.  Idempotent.
  void close();

 private:
  std::string service_name_;
  std::shared_ptr<ListenerState> state_;
};

}  // namespace vmb
