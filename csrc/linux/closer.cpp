#include "linux/closer.hpp"

#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

namespace vmb {

namespace {

class Closer {
 public:
  void push(int fd) noexcept {
    bool queued = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // None yet, or every one busy (each may be stuck in a slow release)
      // with work already waiting: one more thread, up to the cap.
      bool wanted = threads_ == 0 || (idle_ == 0 && !queue_.empty());
      if (wanted && threads_ < kMaxCloserThreads && start_thread()) {
        ++threads_;
        ++idle_;
      }
      if (threads_ > 0) {
        try {
          queue_.push_back(fd);
          ++pending_;
          queued = true;
        } catch (...) {
        }
      }
    }
    if (queued) {
      wake_.notify_one();
    } else {
      ::close(fd);  // no thread could ever be started, or no memory: the caller pays for this one
    }
  }

  CloserStats stats() noexcept {
    std::lock_guard<std::mutex> lock(mutex_);
    return CloserStats{pending_, closed_, threads_};
  }

  bool wait_idle(int timeout_ms) noexcept {
    std::unique_lock<std::mutex> lock(mutex_);
    return drained_.wait_for(lock, std::chrono::milliseconds(timeout_ms), [this] { return pending_ == 0; });
  }

 private:
  bool start_thread() noexcept {
    try {
      std::thread([this] { run(); }).detach();  // lives as long as the process
      return true;
    } catch (...) {
      return false;
    }
  }

  // Counted idle from its start (push() did that), so the pushes that come
  // before it first runs do not start more threads.
  void run() noexcept {
    // Signals belong to the interpreter's main thread, not here.
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, nullptr);
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [this] { return !queue_.empty(); });
      --idle_;
      int fd = queue_.front();
      queue_.pop_front();
      lock.unlock();
      ::close(fd);  // may take long: only this thread waits
      lock.lock();
      ++closed_;
      if (--pending_ == 0) drained_.notify_all();
      ++idle_;
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable drained_;
  std::deque<int> queue_;
  uint64_t pending_ = 0;
  uint64_t closed_ = 0;
  unsigned threads_ = 0;
  unsigned idle_ = 0;  // threads waiting for work
};

// Never destroyed: detached threads use it until the process exits.
Closer& closer() {
  static Closer* instance = new Closer();
  return *instance;
}

}  // namespace

void disarm_linger(int fd) noexcept {
  linger off{0, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &off, sizeof off);
}

void close_later(int fd) noexcept {
  if (fd < 0) return;
  // Disarmed here, while the caller still runs: most slow closes are
  // lingering sockets, and these then close in microseconds on the thread.
  disarm_linger(fd);
  closer().push(fd);
}

CloserStats closer_stats() noexcept { return closer().stats(); }

bool closer_wait_idle(int timeout_ms) noexcept { return closer().wait_idle(timeout_ms); }

}  // namespace vmb
