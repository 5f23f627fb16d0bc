#include "linux/pump.hpp"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <string>
#include <system_error>

#include "common/sys_error.hpp"
#include "linux/closer.hpp"

namespace vmb {

namespace {

std::size_t round_up(std::size_t n, std::size_t to) { return (n + to - 1) / to * to; }

// Most frames moved per wake-up and direction: one recvmmsg/sendmmsg on a
// socket, up to this many read/write calls on a TAP. Then the other
// direction gets its turn, so one busy direction cannot starve the other.
// Fewer when frames are large (pump_batch_frames): the buffers stay within
// kBufferBudget.
constexpr unsigned kBatch = 32;
// Control buffer of one received frame: the fds a datagram can carry
// (SCM_MAX_FD). Frames carry none; any that come are closed by the closer,
// since one left to the kernel (MSG_CTRUNC) would be released in this
// thread, and stop() joins it.
constexpr std::size_t kControlSize = CMSG_SPACE(sizeof(int) * 253);
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

}  // namespace

// Frame buffers for one direction at a time (and their control buffers), in
// one private anonymous mapping: a page costs memory once touched, and
// release() hands them all back to the kernel without unmapping. Which bytes
// were touched is tracked per frame: since the last release (held, what
// stats report) and in the current period of kIdleReleaseMs (recent). At the
// end of a period that used less than half of what is held (a pump gone
// quiet, or down to ARP and router advertisements after a burst of 64 KiB
// frames), everything goes back; a busy pump keeps its pages.
class PumpBuffers {
 public:
  using Clock = std::chrono::steady_clock;

  PumpBuffers(std::size_t frame_size, unsigned frames)
      : stride_(round_up(frame_size, 64)),
        frames_(frames),
        size_(round_up(stride_ * frames + kControlSize * frames, 4096)) {
    base_ = static_cast<char*>(::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (base_ == MAP_FAILED) throw_errno("pump: mmap frame buffers");
  }
  ~PumpBuffers() { ::munmap(base_, size_); }
  PumpBuffers(const PumpBuffers&) = delete;
  PumpBuffers& operator=(const PumpBuffers&) = delete;

  char* frame(unsigned i) { return base_ + i * stride_; }
  char* control(unsigned i) { return base_ + stride_ * frames_ + i * kControlSize; }
  std::size_t size() const { return size_; }

  // Frame `i` was filled up to `len` bytes; returns how many more bytes are held.
  std::size_t touched(unsigned i, std::size_t len) {
    recent_[i] = std::max(recent_[i], len);
    if (len <= held_[i]) return 0;
    if (held_total_ == 0) period_end_ = Clock::now() + std::chrono::milliseconds(kIdleReleaseMs);
    std::size_t more = len - held_[i];
    held_[i] = len;
    held_total_ += more;
    return more;
  }

  // Milliseconds poll() may sleep before the period ends; -1 (forever) while nothing is held.
  int poll_timeout() const {
    if (held_total_ == 0) return -1;
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(period_end_ - Clock::now()).count();
    return static_cast<int>(std::clamp<long long>(left + 1, 0, kIdleReleaseMs));
  }

  // Ends the period if it is over; true if the buffers went back. Call
  // between batches only: no frame is in them then.
  bool maybe_release() {
    if (held_total_ == 0 || Clock::now() < period_end_) return false;
    std::size_t recent_total = 0;
    for (unsigned i = 0; i < frames_; ++i) recent_total += recent_[i];
    std::fill(std::begin(recent_), std::end(recent_), 0);
    period_end_ = Clock::now() + std::chrono::milliseconds(kIdleReleaseMs);
    if (recent_total * 2 >= held_total_) return false;  // still in use
    ::madvise(base_, size_, MADV_DONTNEED);  // anonymous private: reads back as zeros
    std::fill(std::begin(held_), std::end(held_), 0);
    held_total_ = 0;
    return true;
  }

 private:
  std::size_t stride_;
  unsigned frames_;
  std::size_t size_;
  char* base_;
  std::size_t held_[kBatch] = {};
  std::size_t recent_[kBatch] = {};
  std::size_t held_total_ = 0;
  Clock::time_point period_end_{};
};

namespace {

enum class Status { ok, stop, dead };

// The iovecs and headers describing the frames read but not yet written.
struct Batch {
  Batch(PumpBuffers& b, unsigned n, std::size_t size) : buffers(b), frames(n), frame_size(size) {}
  char* frame(unsigned i) { return buffers.frame(i); }

  PumpBuffers& buffers;
  unsigned frames;         // capacity, <= kBatch
  std::size_t frame_size;  // longest frame taken whole
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

// Hands the fds that came with a received frame to the closer; their count.
uint64_t close_arrived_fds(msghdr& msg) {
  uint64_t closed = 0;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (std::size_t i = 0; i < count; ++i, ++closed) {
      int arrived;
      std::memcpy(&arrived, CMSG_DATA(c) + i * sizeof(int), sizeof arrived);
      close_later(arrived);
    }
  }
  return closed;
}

// Reads up to batch.frames frames into `batch`. Frames that cannot be
// forwarded whole (too long for the buffer, or empty) are counted as drops.
Status read_batch(const Pump::End& src, Batch& batch, Pump::Counters& counters, Pump::BufferCounters& buffer) {
  batch.count = 0;
  uint64_t drops = 0, held = 0;
  Status status = Status::ok;
  if (src.socket) {
    for (unsigned i = 0; i < batch.frames; ++i) {
      batch.iov[i] = {batch.frame(i), batch.frame_size};
      batch.msgs[i] = {};
      batch.msgs[i].msg_hdr.msg_iov = &batch.iov[i];
      batch.msgs[i].msg_hdr.msg_iovlen = 1;
      batch.msgs[i].msg_hdr.msg_control = batch.buffers.control(i);
      batch.msgs[i].msg_hdr.msg_controllen = kControlSize;
    }
    int n;
    while ((n = ::recvmmsg(src.fd.get(), batch.msgs, batch.frames, MSG_DONTWAIT | MSG_CMSG_CLOEXEC, nullptr)) < 0 &&
           errno == EINTR) {
    }
    // Other errors were a pending socket error, reported (and cleared) once.
    if (n < 0 && fatal(errno)) return Status::dead;
    // Every received frame's fds first: the loop below may stop early.
    for (int i = 0; i < n; ++i) {
      if (batch.msgs[i].msg_hdr.msg_controllen > 0) {
        buffer.fds_closed.fetch_add(close_arrived_fds(batch.msgs[i].msg_hdr), std::memory_order_relaxed);
      }
    }
    for (int i = 0; i < n; ++i) {
      std::size_t len = batch.msgs[i].msg_len;
      held += batch.buffers.touched(i, std::min(len, batch.frame_size));
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
    for (unsigned i = 0; i < batch.frames; ++i) {
      ssize_t n;
      while ((n = ::read(src.fd.get(), batch.frame(i), batch.frame_size)) < 0 && errno == EINTR) {
      }
      if (n > 0) {
        held += batch.buffers.touched(i, static_cast<std::size_t>(n));
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
  if (held) buffer.held.fetch_add(held, std::memory_order_relaxed);
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
               Pump::Counters& counters, Pump::BufferCounters& buffer) {
  if (revents & POLLNVAL) return Status::dead;
  Status status = read_batch(src, batch, counters, buffer);
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

std::size_t pump_frame_size(int mtu, bool vnet_hdr) {
  if (vnet_hdr || mtu <= 0) return kMaxFrameSize;
  // Ethernet header (14) and two VLAN tags (802.1ad + 802.1Q, 8).
  return std::clamp<std::size_t>(static_cast<std::size_t>(mtu) + 14 + 8, 64, kMaxFrameSize);
}

unsigned pump_batch_frames(std::size_t frame_size) {
  std::size_t fit = kBufferBudget / std::max<std::size_t>(frame_size, 1);
  return static_cast<unsigned>(std::clamp<std::size_t>(fit, 1, kBatch));
}

Pump::Pump(int a, int b, std::size_t frame_size)
    : a_(adopt_end(a)),
      b_(adopt_end(b)),
      frame_size_(std::clamp<std::size_t>(frame_size, 64, kMaxFrameSize)),
      batch_frames_(pump_batch_frames(frame_size_)) {
  buffers_ = std::make_unique<PumpBuffers>(frame_size_, batch_frames_);
  buffer_bytes_ = buffers_->size();
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
  PumpBuffers& buffers = *buffers_;
  Batch batch(buffers, batch_frames_, frame_size_);
  for (;;) {
    if (buffers.maybe_release()) {
      buffer_.held.store(0, std::memory_order_relaxed);
      buffer_.releases.fetch_add(1, std::memory_order_relaxed);
    }
    pollfd fds[3] = {{a_.fd.get(), POLLIN, 0}, {b_.fd.get(), POLLIN, 0}, {wake_.get(), POLLIN, 0}};
    int ready = ::poll(fds, 3, buffers.poll_timeout());
    if (ready < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (ready == 0) continue;  // the period is over: maybe_release() above
    if (fds[2].revents) break;
    // Either fd dying ends both directions: each fd is the source of one
    // and the destination of the other.
    if (fds[0].revents && forward(a_, b_, fds[0].revents, wake_.get(), batch, a_to_b_, buffer_) != Status::ok) break;
    if (fds[1].revents && forward(b_, a_, fds[1].revents, wake_.get(), batch, b_to_a_, buffer_) != Status::ok) break;
  }
  running_ = false;
}

Pump::~Pump() { stop(); }

void Pump::stop() noexcept {
  std::lock_guard<std::mutex> lock(stop_mutex_);
  if (!thread_.joinable()) return;
  uint64_t one = 1;
  // Cannot fail short of the counter overflowing, which one write cannot do.
  [[maybe_unused]] ssize_t n = ::write(wake_.get(), &one, sizeof one);
  thread_.join();
  running_ = false;
  // The dups would otherwise keep a TAP device alive as long as this object.
  // To the closer: a datagram socket still holding frames a client sent
  // with fds would release them in close(), and that can wait.
  close_later(a_.fd.release());
  close_later(b_.fd.release());
  wake_.reset();
  buffers_.reset();
}

PumpStats Pump::stats() const noexcept {
  auto load = [](const std::atomic<uint64_t>& v) { return v.load(std::memory_order_relaxed); };
  return PumpStats{load(a_to_b_.frames), load(a_to_b_.bytes),    load(a_to_b_.drops),
                   load(b_to_a_.frames), load(b_to_a_.bytes),    load(b_to_a_.drops),
                   buffer_bytes_,        load(buffer_.held),     load(buffer_.releases),
                   load(buffer_.fds_closed)};
}

}  // namespace vmb
