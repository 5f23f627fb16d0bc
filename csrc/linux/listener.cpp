#include "linux/listener.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstring>

#include "common/sys_error.hpp"
#include "linux/closer.hpp"

namespace vmb {

namespace {

// True when the peer closed or shut down its end (no more packets will come).
bool peer_gone(int fd) {
  pollfd p{fd, POLLRDHUP, 0};
  int r;
  do {
    r = ::poll(&p, 1, 0);
  } while (r < 0 && errno == EINTR);
  return r < 0 || (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
}

// SCM_MAX_FD in the kernel: more fds on one sendmsg() is EINVAL.
constexpr std::size_t kKernelMaxFds = 253;
static_assert(kMaxFds >= kKernelMaxFds, "every fd a packet can carry must fit the control buffer");

// Hands every fd of the SCM_RIGHTS messages in `msg` to the closer.
void close_arrived_fds(msghdr& msg) {
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (std::size_t i = 0; i < count; ++i) {
      int arrived;
      std::memcpy(&arrived, CMSG_DATA(c) + i * sizeof(int), sizeof arrived);
      close_later(arrived);
    }
  }
}

void make_parent_dirs(const std::string& path) {
  // Each prefix ending before a '/' is a directory to create; "/" itself is skipped.
  for (std::size_t slash = path.find('/', 1); slash != std::string::npos;
       slash = path.find('/', slash + 1)) {
    std::string dir = path.substr(0, slash);
    if (::mkdir(dir.c_str(), 0755) < 0 && errno != EEXIST) throw_errno("mkdir", dir);
  }
}

sockaddr_un unix_address(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) throw SysError(ENAMETOOLONG, "bind", path);
  std::memcpy(addr.sun_path, path.data(), path.size());
  return addr;
}

// Removes a socket file left by an earlier process; anything else stays and
// bind() reports it.
void remove_stale_socket(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) {
    if (::unlink(path.c_str()) < 0 && errno != ENOENT) throw_errno("unlink", path);
  }
}

int get_int_option(int fd, int level, int option, const char* operation) {
  int value = 0;
  socklen_t len = sizeof value;
  if (::getsockopt(fd, level, option, &value, &len) < 0) throw_errno(operation);
  return value;
}

}  // namespace

Listener::Listener(const std::string& path, mode_t mode, int backlog) : path_(path) {
  sockaddr_un addr = unix_address(path);
  make_parent_dirs(path);
  remove_stale_socket(path);

  fd_ = UniqueFd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd_) throw_errno("socket", path);
  if (::bind(fd_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0) throw_errno("bind", path);
  try {
    struct stat st {};
    if (::stat(path.c_str(), &st) < 0) throw_errno("stat", path);
    dev_ = st.st_dev;
    ino_ = st.st_ino;
    bound_ = true;
    if (::chmod(path.c_str(), mode) < 0) throw_errno("chmod", path);
    if (::listen(fd_.get(), backlog) < 0) throw_errno("listen", path);
  } catch (...) {
    close();  // the destructor does not run for a constructor that throws
    throw;
  }
}

std::unique_ptr<Listener> Listener::adopt(int fd) {
  if (get_int_option(fd, SOL_SOCKET, SO_TYPE, "adopt listener") != SOCK_SEQPACKET)
    throw SysError(EPROTOTYPE, "adopt listener: not SOCK_SEQPACKET");
  if (!get_int_option(fd, SOL_SOCKET, SO_ACCEPTCONN, "adopt listener"))
    throw SysError(EINVAL, "adopt listener: not listening");

  sockaddr_un addr{};
  socklen_t len = sizeof addr;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) < 0) throw_errno("getsockname");
  std::string path;
  std::size_t path_len = len > offsetof(sockaddr_un, sun_path) ? len - offsetof(sockaddr_un, sun_path) : 0;
  if (path_len > 0 && addr.sun_path[0] == '\0') {
    path = "@" + std::string(addr.sun_path + 1, path_len - 1);  // abstract name, as ss(8) shows it
  } else {
    path = std::string(addr.sun_path, strnlen(addr.sun_path, path_len));
  }

  int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) throw_errno("fcntl O_NONBLOCK", path);
  if (::fcntl(fd, F_SETFD, FD_CLOEXEC) < 0) throw_errno("fcntl FD_CLOEXEC", path);

  std::unique_ptr<Listener> listener(new Listener());
  listener->fd_ = UniqueFd(fd);
  listener->path_ = std::move(path);
  return listener;
}

std::optional<Connection> Listener::accept() {
  if (!fd_) throw SysError(EBADF, "accept", path_);
  for (;;) {
    UniqueFd conn(::accept4(fd_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
    if (!conn) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) return std::nullopt;
      // The client gave up before we got to it, or a signal: try the next one.
      if (errno == ECONNABORTED || errno == EINTR) continue;
      throw_errno("accept", path_);
    }
    ucred cred{};
    socklen_t len = sizeof cred;
    if (::getsockopt(conn.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) throw_errno("SO_PEERCRED", path_);
    return Connection(std::move(conn), cred.pid, cred.uid, cred.gid);
  }
}

void Listener::close() noexcept {
  fd_.reset();
  if (!bound_) return;
  bound_ = false;
  // A newer broker may have replaced the file since: only unlink our own.
  struct stat st {};
  if (::lstat(path_.c_str(), &st) == 0 && st.st_dev == dev_ && st.st_ino == ino_) ::unlink(path_.c_str());
}

void Connection::close() noexcept {
  if (!fd_) return;
  // Closing a socket releases the packets still queued on it, and with them
  // the files they carry, in the closing thread: read them here instead, so
  // their fds go to the closer, and let a closer thread close the socket (a
  // packet that came after the drain, or a nested one, waits there, not here).
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
  char byte;
  for (int i = 0; i < kDrainOnClose; ++i) {
    iovec iov{&byte, 1};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t n = ::recvmsg(fd_.get(), &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      break;  // EAGAIN: drained
    }
    bool had_fds = msg.msg_controllen > 0;
    close_arrived_fds(msg);
    // EOF (or an empty packet without fds from a peer that is gone): done.
    if (n == 0 && !had_fds && peer_gone(fd_.get())) break;
  }
  close_later(fd_.release());
}

int Connection::checked_fd(const char* operation) const {
  if (!fd_) throw SysError(EBADF, operation);
  return fd_.get();
}

std::optional<Message> Connection::recv() {
  int fd = checked_fd("recv");
  std::string data(kMaxMessage, '\0');
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];

  for (;;) {
    iovec iov{data.data(), data.size()};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    // MSG_TRUNC: the return value is the packet's real length, so an
    // oversize request is reported instead of silently cut.
    ssize_t n = ::recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | MSG_TRUNC | MSG_DONTWAIT);
    int saved = errno;

    // The protocol takes no fds from clients: whatever arrived is closed,
    // on the closer's threads, since a close can wait as long as the
    // client likes (a lingering TCP socket with a full send queue). The
    // control buffer holds the most a packet can carry, so none was left
    // for the kernel to release in this thread.
    if (n >= 0) close_arrived_fds(msg);

    if (n < 0) {
      if (saved == EINTR) continue;
      if (saved == EAGAIN || saved == EWOULDBLOCK) return std::nullopt;
      if (saved == ECONNRESET) throw ConnectionClosedError(saved, "recv: connection reset by peer");
      throw SysError(saved, "recv");
    }
    // A zero-length packet reads like EOF.  It is a malformed request, not a
    // goodbye: only a peer that is really gone sets POLLRDHUP/POLLHUP.
    if (n == 0 && peer_gone(fd)) throw ConnectionClosedError(0, "recv: connection closed by peer");

    bool truncated = static_cast<std::size_t>(n) > kMaxMessage || (msg.msg_flags & MSG_TRUNC);
    data.resize(std::min(static_cast<std::size_t>(n), kMaxMessage));
    return Message{std::move(data), truncated};
  }
}

void Connection::send(const char* data, std::size_t size, const std::vector<int>& fds) {
  int fd = checked_fd("send");
  if (fds.size() > kKernelMaxFds) throw SysError(EINVAL, "send: too many fds");

  iovec iov{const_cast<char*>(data), size};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<char> control;
  if (!fds.empty()) {
    control.resize(CMSG_SPACE(sizeof(int) * fds.size()));  // operator new aligns for cmsghdr
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }

  for (;;) {
    if (::sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL) >= 0) return;  // seqpacket: all or nothing
    if (errno == EINTR) continue;
    if (errno == EPIPE || errno == ECONNRESET)
      throw ConnectionClosedError(errno, "send: connection closed by peer");
    throw_errno("send");
  }
}

}  // namespace vmb
