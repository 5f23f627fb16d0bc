// A private serial dispatch queue, and the one safe way to run C++ on it.
#pragma once

#include <dispatch/dispatch.h>

#include <exception>

namespace vmb {

class SerialQueue {
 public:
  // `label` only names the queue in crash reports and spindumps.
  explicit SerialQueue(const char* label) : queue_(dispatch_queue_create(label, DISPATCH_QUEUE_SERIAL)) {
    // dispatch_get_specific also searches the target queues, so a block of
    // a connection targeted at this queue finds the mark too.
    dispatch_queue_set_specific(queue_, &key_, this, nullptr);
  }
  ~SerialQueue() { dispatch_release(queue_); }

  SerialQueue(const SerialQueue&) = delete;
  SerialQueue& operator=(const SerialQueue&) = delete;

  dispatch_queue_t get() const noexcept { return queue_; }

  // True when the calling code already runs on this queue, where
  // dispatch_sync onto it would deadlock.
  bool on_queue() const noexcept { return dispatch_get_specific(&key_) == this; }

  // Runs `f` on the queue and waits for it.  A C++ exception must never
  // unwind through a block or libdispatch's frames (they are C), so it is
  // caught inside the block and rethrown here.  Already on the queue, `f`
  // runs inline.
  template <typename F>
  void sync(F&& f) {
    if (on_queue()) {
      f();
      return;
    }
    std::exception_ptr error;
    auto* fn = &f;  // blocks copy their captures: capture pointers, not the callable
    std::exception_ptr* out = &error;
    dispatch_sync(queue_, ^{
      try {
        (*fn)();
      } catch (...) {
        *out = std::current_exception();
      }
    });
    if (error) std::rethrow_exception(error);
  }

  // Returns once every block queued before the call has run.
  void barrier() {
    sync([] {});
  }

 private:
  dispatch_queue_t queue_;
  char key_ = 0;  // its address is the queue-specific key; the value is unused
};

}  // namespace vmb
