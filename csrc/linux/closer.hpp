// Closing files that clients sent us, on threads of their own.
//
// Closing the last reference to a file runs its release in the closing
// thread, and some releases wait: a TCP socket with SO_LINGER waits for its
// send queue to drain (as long as the linger time says, which whoever set it
// chooses: up to forever against a peer that never reads), a FUSE file waits
// for its daemon, a Unix socket releases every file still queued in it. A
// client can hand the broker such files on any packet, so the broker never
// closes them on its event loop: they go here.
#pragma once

#include <cstdint>

namespace vmb {

// Turns SO_LINGER off on a socket so that closing it returns at once. The
// kernel still sends what is queued and then a FIN: a normal close, not the
// reset that SO_LINGER {1, 0} would send. Harmless on anything that is not a
// socket (the call fails with ENOTSOCK, ignored).
void disarm_linger(int fd) noexcept;

// Takes ownership of `fd` and closes it soon on a closer thread, never on
// the caller's. Never blocks the caller (beyond a mutex held for a push) and
// never throws; if no closer thread can be started at all, the fd is closed
// here after disarm_linger().
void close_later(int fd) noexcept;

// Closer threads are started as work waits and none is idle, up to this many;
// each can be held up by one slow release, the rest keep closing.
constexpr unsigned kMaxCloserThreads = 8;

struct CloserStats {
  uint64_t pending;  // handed over, not closed yet (queued or being closed)
  uint64_t closed;   // closed since the process started
  unsigned threads;  // closer threads started
};

CloserStats closer_stats() noexcept;

// Waits until every fd handed over before the call is closed, or `timeout_ms`
// passes; true when they are. Call without the GIL.
bool closer_wait_idle(int timeout_ms) noexcept;

}  // namespace vmb
