// A native thread forwarding frames both ways between two fds.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>

#include "common/unique_fd.hpp"

namespace vmb {

// The largest frame a pump forwards: a 64 KiB GSO segment plus the 12-byte
// vnet header and Ethernet and VLAN headers. A TAP read into a smaller
// buffer silently cuts the frame.
constexpr std::size_t kMaxFrameSize = 65536 + 256;
// Frame buffers of one pump are at most this many bytes (and at least one
// frame): 32 frames of a 1500-byte network (48 KiB), 3 of a vnet_hdr one.
// They are mapped, not allocated, and given back to the kernel at the end
// of a kIdleReleaseMs period that used less than half of what they hold, so
// a quiet attachment holds none (a burst of 64 KiB frames once pinned 2 MiB
// for the attachment's whole life).
constexpr std::size_t kBufferBudget = 256 * 1024;
constexpr int kIdleReleaseMs = 1000;

// The largest frame on a network of `mtu` (pure): Ethernet header and two
// VLAN tags on top of the MTU; with a vnet header (TSO, GSO) any frame up to
// kMaxFrameSize. Clamped to [64, kMaxFrameSize].
std::size_t pump_frame_size(int mtu, bool vnet_hdr);
// Frames per batch for frames of `frame_size` (pure): as many as fit
// kBufferBudget, between 1 and 32.
unsigned pump_batch_frames(std::size_t frame_size);

struct PumpStats {
  uint64_t a_to_b_frames, a_to_b_bytes, a_to_b_drops;
  uint64_t b_to_a_frames, b_to_a_bytes, b_to_a_drops;
  uint64_t buffer_bytes;     // size of the frame buffers
  uint64_t buffer_held;      // of those, touched since the last release (0 when idle)
  uint64_t buffer_releases;  // times the buffers went back to the kernel
  uint64_t fds_closed;       // fds that arrived on a socket end (closed, never used)
};

class PumpBuffers;  // pump.cpp

class Pump {
 public:
  // Each fd is a TAP (or other frame device, one frame per read/write) or a
  // datagram/seqpacket socket (batched). Both are dup'ed; the caller keeps its
  // own. Frames longer than `frame_size` are dropped (counted).
  Pump(int a, int b, std::size_t frame_size = kMaxFrameSize);
  ~Pump();

  Pump(const Pump&) = delete;
  Pump& operator=(const Pump&) = delete;

  // Stops and joins the thread, then hands the dup'ed fds to the closer
  // (closer.hpp); idempotent. Blocks briefly: call without the GIL.
  void stop() noexcept;
  // False once the thread has ended, by stop() or because an fd died.
  bool running() const noexcept { return running_.load(); }
  PumpStats stats() const noexcept;

  struct Counters {
    std::atomic<uint64_t> frames{0}, bytes{0}, drops{0};
  };
  struct End {
    UniqueFd fd;
    bool socket = false;    // batched with recvmmsg/sendmmsg
    bool datagram = false;  // SOCK_DGRAM: an empty read is an empty frame, not EOF
  };
  struct BufferCounters {
    std::atomic<uint64_t> held{0}, releases{0}, fds_closed{0};
  };

 private:
  void run() noexcept;

  End a_, b_;
  std::size_t frame_size_;
  unsigned batch_frames_;
  std::unique_ptr<PumpBuffers> buffers_;  // used by the thread only; freed by stop()
  uint64_t buffer_bytes_ = 0;
  UniqueFd wake_;  // eventfd: stop() writes it, the thread polls it
  Counters a_to_b_, b_to_a_;
  BufferCounters buffer_;
  std::atomic<bool> running_{false};
  std::mutex stop_mutex_;  // two stop() calls must not both join
  std::thread thread_;
};

}  // namespace vmb
