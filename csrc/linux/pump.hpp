// A native thread forwarding frames both ways between two fds.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <thread>

#include "common/unique_fd.hpp"

namespace vmb {

struct PumpStats {
  uint64_t a_to_b_frames, a_to_b_bytes, a_to_b_drops;
  uint64_t b_to_a_frames, b_to_a_bytes, b_to_a_drops;
};

class Pump {
 public:
  // Each fd is a TAP (or other frame device, one frame per read/write) or a
  // datagram/seqpacket socket (batched). Both are dup'ed; the caller keeps its own.
  Pump(int a, int b);
  ~Pump() { stop(); }

  Pump(const Pump&) = delete;
  Pump& operator=(const Pump&) = delete;

  // Stops and joins the thread, then closes the dup'ed fds; idempotent.
  // Blocks briefly: call without the GIL.
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

 private:
  void run() noexcept;

  End a_, b_;
  UniqueFd wake_;  // eventfd: stop() writes it, the thread polls it
  Counters a_to_b_, b_to_a_;
  std::atomic<bool> running_{false};
  std::mutex stop_mutex_;  // two stop() calls must not both join
  std::thread thread_;
};

}  // namespace vmb
