// Unix SOCK_SEQPACKET listener and its connections: the broker's transport.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/unique_fd.hpp"

namespace vmb {

constexpr std::size_t kMaxMessage = 65536;  // largest request packet accepted
// Most fds one packet can carry (the kernel's SCM_MAX_FD). Received fds are
// never used, but the control buffer takes them all: an fd that does not fit
// (MSG_CTRUNC) is released by the kernel in the receiving thread, and that
// release may wait (see closer.hpp).
constexpr std::size_t kMaxFds = 253;
// Packets read and dropped when a connection closes, so that their fds go to
// the closer instead of being released inside close().
constexpr int kDrainOnClose = 1024;

// The peer closed its end or reset the connection. `code` is 0 for EOF.
class ConnectionClosedError : public std::runtime_error {
 public:
  ConnectionClosedError(int code, const std::string& what) : std::runtime_error(what), code_(code) {}
  int code() const noexcept { return code_; }

 private:
  int code_;
};

struct Message {
  std::string data;  // at most kMaxMessage bytes
  bool truncated;    // the packet was longer than kMaxMessage
};

class Connection {
 public:
  Connection(UniqueFd fd, pid_t pid, uid_t uid, gid_t gid)
      : fd_(std::move(fd)), pid_(pid), uid_(uid), gid_(gid) {}
  Connection(Connection&&) = default;
  Connection& operator=(Connection&&) = default;
  ~Connection() { close(); }

  pid_t pid() const noexcept { return pid_; }
  uid_t uid() const noexcept { return uid_; }
  gid_t gid() const noexcept { return gid_; }
  int fileno() const noexcept { return fd_.get(); }

  // One packet, or nullopt if none is waiting. Arrived fds are handed to
  // the closer (closer.hpp): nothing a client sends can make this wait.
  std::optional<Message> recv();
  // One packet with `fds` attached; never blocks (EAGAIN is a SysError).
  void send(const char* data, std::size_t size, const std::vector<int>& fds);
  // Reads and drops the packets still queued (their fds to the closer), then
  // hands the socket itself to the closer. Idempotent; never blocks.
  void close() noexcept;

 private:
  int checked_fd(const char* operation) const;

  UniqueFd fd_;
  pid_t pid_;
  uid_t uid_;
  gid_t gid_;
};

class Listener {
 public:
  // Creates the parent directory, replaces a stale socket file, binds,
  // applies `mode`, listens.
  Listener(const std::string& path, mode_t mode, int backlog);
  // Adopts a bound, listening SOCK_SEQPACKET socket; close() will not unlink.
  // On error the caller still owns `fd`.
  static std::unique_ptr<Listener> adopt(int fd);
  ~Listener() { close(); }

  Listener(const Listener&) = delete;
  Listener& operator=(const Listener&) = delete;

  const std::string& path() const noexcept { return path_; }
  int fileno() const noexcept { return fd_.get(); }
  // One pending connection, or nullopt if none is waiting.
  std::optional<Connection> accept();
  // Closes the socket; unlinks the path if this listener bound it and the
  // file there is still ours. Idempotent.
  void close() noexcept;

 private:
  Listener() = default;

  UniqueFd fd_;
  std::string path_;
  bool bound_ = false;  // we created the socket file
  dev_t dev_ = 0;       // identity of the socket file we created
  ino_t ino_ = 0;
};

}  // namespace vmb
