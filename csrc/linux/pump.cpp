#include "linux/pump.hpp"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <memory>
#include <string>
#include <system_error>

#include "common/sys_error.hpp"

namespace vmb {

namespace {

// Frames moved per wake-up and direction: one recvmmsg/sendmmsg on a socket,
// up to this many read/write calls on a TAP. Then the other direction gets
// its turn, so one busy direction cannot starve the other.
constexpr unsigned kBatch = 32;
// One frame: a 64 KiB GSO segment plus the 12-byte vnet header and Ethernet
// and VLAN headers. A TAP read into a smaller buffer silently cuts the frame.
constexpr std::size_t kFrameSize = 65536 + 256;
// A full destination (EAGAIN/ENOBUFS) is waited on for POLLOUT, up to
// kRetryWaitMs each time, before the rest of the batch is dropped: after
// kRetryMax waits in a row without progress, or kBatchWaitMax waits in all.
// Measured: a TCP stream guest -> socketpair -> broker at ~8 Gbit/s (64 KiB
// GSO frames; a default socket buffer holds only ~3 of them) needs a few
// waits per batch and drops nothing with these values. The pump is one
// thread, so they also bound how long the other direction waits (~20 ms);
// a reader that has not drained its queue by then is not keeping up, and
// dropping is what a NIC with a full ring does too.
constexpr int kRetryMax = 5;
constexpr int kBatchWaitMax = 20;
constexpr int kRetryWaitMs = 1;

enum class Status { ok, stop, dead };

// Frame buffers for one direction at a time, and the iovecs describing the
// frames read but not yet written.
struct Batch {
  Batch() : data(new char[kBatch * kFrameSize]) {}  // not value-initialised: pages stay untouched until used
  char* frame(unsigned i) { return data.get() + i * kFrameSize; }

  std::unique_ptr<char[]> data;
  iovec iov[kBatch];
  mmsghdr msgs[kBatch];
  unsigned count = 0;
};

bool retry_later(int code) { return code == EAGAIN || code == EWOULDBLOCK || code == ENOBUFS; }

// The fd (or what is behind it) is gone: nothing on it will ever work again.
// EBADFD is a TAP whose device was deleted; ECONNREFUSED/ENOTCONN a datagram
// peer that closed its end. Anything else concerns one frame (EINVAL: a runt
// frame or a bad vnet header; EIO/ENETDOWN: a TAP that is down).
bool fatal(int code) {
  switch (code) {
    case EBADF:
    case EBADFD:
    case EPIPE:
    case ECONNRESET:
    case ECONNREFUSED:
    case ENOTCONN:
    case EDESTADDRREQ:
    case ENXIO:
    case ENODEV:
    case ENOTSOCK:
      return true;
    default:
      return false;
  }
}

// Waits until `fd` may take more, the timeout passes, or stop() is called.
Status wait_writable(int fd, int wake) {
  pollfd fds[2] = {{fd, POLLOUT, 0}, {wake, POLLIN, 0}};
  if (::poll(fds, 2, kRetryWaitMs) > 0 && fds[1].revents) return Status::stop;
  return Status::ok;
}

// Reads up to kBatch frames into `batch`. Frames that cannot be forwarded
// whole (too long for the buffer, or empty) are counted as drops.
Status read_batch(const Pump::End& src, Batch& batch, Pump::Counters& counters) {
  batch.count = 0;
  uint64_t drops = 0;
  Status status = Status::ok;
  if (src.socket) {
    for (unsigned i = 0; i < kBatch; ++i) {
      batch.iov[i] = {batch.frame(i), kFrameSize};
      batch.msgs[i] = {};
      batch.msgs[i].msg_hdr.msg_iov = &batch.iov[i];
      batch.msgs[i].msg_hdr.msg_iovlen = 1;
    }
    int n;
    while ((n = ::recvmmsg(src.fd.get(), batch.msgs, kBatch, MSG_DONTWAIT, nullptr)) < 0 && errno == EINTR) {
    }
    // Other errors were a pending socket error, reported (and cleared) once.
    if (n < 0 && fatal(errno)) return Status::dead;
    for (int i = 0; i < n; ++i) {
      std::size_t len = batch.msgs[i].msg_len;
      if (len == 0 && !src.datagram) {  // seqpacket EOF: forward what came before it
        status = Status::dead;
        break;
      }
      if (len == 0 || (batch.msgs[i].msg_hdr.msg_flags & MSG_TRUNC)) {
        ++drops;
        continue;
      }
      batch.iov[batch.count++] = {batch.frame(i), len};  // count <= i: compacting in place is safe
    }
  } else {
    for (unsigned i = 0; i < kBatch; ++i) {
      ssize_t n;
      while ((n = ::read(src.fd.get(), batch.frame(i), kFrameSize)) < 0 && errno == EINTR) {
      }
      if (n > 0) {
        batch.iov[batch.count++] = {batch.frame(i), static_cast<std::size_t>(n)};
        continue;
      }
      if (n < 0 && !retry_later(errno) && !fatal(errno)) {
        ++drops;  // the kernel dropped this frame while copying it out
        continue;
      }
      // EOF, or the device is gone (a deleted TAP reads EBADFD): forward
      // what was already read, then end.
      if (n == 0 || fatal(errno)) status = Status::dead;
      break;
    }
  }
  if (drops) counters.drops.fetch_add(drops, std::memory_order_relaxed);
  return status;
}

// Writes the frames in `batch` to `dst`; counts them as forwarded or dropped.
Status write_batch(const Pump::End& dst, int wake, Batch& batch, Pump::Counters& counters) {
  uint64_t frames = 0, bytes = 0, drops = 0;
  Status status = Status::ok;
  int retries = 0, waits = 0;
  unsigned next = 0;

  if (dst.socket) {
    for (unsigned i = 0; i < batch.count; ++i) {
      batch.msgs[i] = {};
      batch.msgs[i].msg_hdr.msg_iov = &batch.iov[i];
      batch.msgs[i].msg_hdr.msg_iovlen = 1;
    }
  }
  while (next < batch.count) {
    int sent;
    if (dst.socket) {
      sent = ::sendmmsg(dst.fd.get(), batch.msgs + next, batch.count - next, MSG_DONTWAIT | MSG_NOSIGNAL);
    } else {
      sent = ::write(dst.fd.get(), batch.iov[next].iov_base, batch.iov[next].iov_len) < 0 ? -1 : 1;
    }
    if (sent > 0) {
      retries = 0;  // the budget is for waits without progress
      for (int i = 0; i < sent; ++i, ++next) {
        ++frames;
        bytes += batch.iov[next].iov_len;
      }
      continue;
    }
    int code = errno;
    if (code == EINTR) continue;
    if (retry_later(code)) {
      if (retries++ < kRetryMax && waits++ < kBatchWaitMax) {
        status = wait_writable(dst.fd.get(), wake);
        if (status == Status::ok) continue;
      }
      drops += batch.count - next;  // still full, or stopping: drop the rest
      break;
    }
    if (fatal(code)) {
      drops += batch.count - next;
      status = Status::dead;
      break;
    }
    // This frame alone was refused (EIO/ENETDOWN on a down device, EMSGSIZE, ...).
    ++drops;
    ++next;
  }
  counters.frames.fetch_add(frames, std::memory_order_relaxed);
  counters.bytes.fetch_add(bytes, std::memory_order_relaxed);
  counters.drops.fetch_add(drops, std::memory_order_relaxed);
  return status;
}

Status forward(const Pump::End& src, const Pump::End& dst, short revents, int wake, Batch& batch,
               Pump::Counters& counters) {
  if (revents & POLLNVAL) return Status::dead;
  Status status = read_batch(src, batch, counters);
  if (batch.count == 0) {
    // Woken for a hangup or an error with nothing to read: polling again
    // would wake at once, forever. A dgram socket only reports POLLHUP after
    // shutdown, a TAP POLLERR when its device is going away.
    if (revents & (POLLHUP | POLLERR)) return Status::dead;
    return status;
  }
  Status written = write_batch(dst, wake, batch, counters);
  return written != Status::ok ? written : status;
}

Pump::End adopt_end(int fd) {
  const std::string name = "fd " + std::to_string(fd);
  Pump::End end;
  end.fd = UniqueFd(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
  if (!end.fd) throw_errno("pump: dup", name);
  struct stat st {};
  if (::fstat(end.fd.get(), &st) < 0) throw_errno("pump: fstat", name);
  end.socket = S_ISSOCK(st.st_mode);
  if (end.socket) {
    int type = 0;
    socklen_t len = sizeof type;
    if (::getsockopt(end.fd.get(), SOL_SOCKET, SO_TYPE, &type, &len) < 0) throw_errno("pump: SO_TYPE", name);
    if (type == SOCK_STREAM) throw SysError(EPROTOTYPE, "pump: a stream socket has no frame boundaries", name);
    end.datagram = type == SOCK_DGRAM;
    // Sockets get MSG_DONTWAIT per call, leaving the caller's file flags alone.
  } else {
    // O_NONBLOCK lives in the open file description, so the caller's fd
    // shares it; TAP fds from Tap are non-blocking already.
    int flags = ::fcntl(end.fd.get(), F_GETFL);
    if (flags < 0 || ::fcntl(end.fd.get(), F_SETFL, flags | O_NONBLOCK) < 0) throw_errno("pump: O_NONBLOCK", name);
  }
  return end;
}

}  // namespace

Pump::Pump(int a, int b) : a_(adopt_end(a)), b_(adopt_end(b)) {
  wake_ = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake_) throw_errno("pump: eventfd");
  running_ = true;
  try {
    thread_ = std::thread([this] { run(); });
  } catch (const std::system_error& e) {
    running_ = false;
    throw SysError(e.code().value(), "pump: start thread");
  }
}

void Pump::run() noexcept {
  // Signals belong to the interpreter's main thread, not here.
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, nullptr);
  try {
    Batch batch;
    for (;;) {
      pollfd fds[3] = {{a_.fd.get(), POLLIN, 0}, {b_.fd.get(), POLLIN, 0}, {wake_.get(), POLLIN, 0}};
      if (::poll(fds, 3, -1) < 0) {
        if (errno == EINTR) continue;
        break;
      }
      if (fds[2].revents) break;
      // Either fd dying ends both directions: each fd is the source of one
      // and the destination of the other.
      if (fds[0].revents && forward(a_, b_, fds[0].revents, wake_.get(), batch, a_to_b_) != Status::ok) break;
      if (fds[1].revents && forward(b_, a_, fds[1].revents, wake_.get(), batch, b_to_a_) != Status::ok) break;
    }
  } catch (...) {
    // Only allocating the batch can throw; the thread just ends.
  }
  running_ = false;
}

void Pump::stop() noexcept {
  std::lock_guard<std::mutex> lock(stop_mutex_);
  if (!thread_.joinable()) return;
  uint64_t one = 1;
  // Cannot fail short of the counter overflowing, which one write cannot do.
  [[maybe_unused]] ssize_t n = ::write(wake_.get(), &one, sizeof one);
  thread_.join();
  running_ = false;
  // The dups would otherwise keep a TAP device alive as long as this object.
  a_.fd.reset();
  b_.fd.reset();
  wake_.reset();
}

PumpStats Pump::stats() const noexcept {
  auto load = [](const std::atomic<uint64_t>& v) { return v.load(std::memory_order_relaxed); };
  return PumpStats{load(a_to_b_.frames), load(a_to_b_.bytes), load(a_to_b_.drops),
                   load(b_to_a_.frames), load(b_to_a_.bytes), load(b_to_a_.drops)};
}

}  // namespace vmb
