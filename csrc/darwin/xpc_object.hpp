// Owners for the two reference-counted families the macOS mechanism holds:
// XPC objects (xpc_retain/xpc_release) and the CoreFoundation-style vmnet
// refs (CFRelease).  Every handle the mechanism keeps lives in one of these,
// so an exception anywhere releases what was made so far.
#pragma once

#include <CoreFoundation/CoreFoundation.h>
#include <xpc/xpc.h>

#include <utility>

namespace vmb {

// Copyable: a copy is another reference (xpc_retain), which is what a
// container, a pending request or a Python wrapper each need to hold.
// T is xpc_object_t or one of its subtypes such as xpc_connection_t (in
// Objective-C++ the two are the same type, so nothing may overload on them).
template <typename T>
class XpcRef {
 public:
  XpcRef() noexcept = default;

  // Takes over a reference the caller owns (a *_create or *_copy result).
  static XpcRef adopt(T object) noexcept {
    XpcRef ref;
    ref.object_ = object;
    return ref;
  }
  // Keeps a borrowed object (an event handler's argument, a dictionary
  // value) past the moment it is guaranteed to live.
  static XpcRef retain(T object) noexcept {
    if (object != nullptr) xpc_retain(object);
    return adopt(object);
  }

  ~XpcRef() { reset(); }
  XpcRef(const XpcRef& other) noexcept : object_(other.object_) {
    if (object_ != nullptr) xpc_retain(object_);
  }
  XpcRef(XpcRef&& other) noexcept : object_(other.release()) {}
  XpcRef& operator=(XpcRef other) noexcept {
    std::swap(object_, other.object_);
    return *this;
  }

  T get() const noexcept { return object_; }
  explicit operator bool() const noexcept { return object_ != nullptr; }

  // Hands the reference on; the caller now releases it.
  T release() noexcept {
    T object = object_;
    object_ = nullptr;
    return object;
  }
  void reset() noexcept {
    if (object_ != nullptr) xpc_release(object_);
    object_ = nullptr;
  }

 private:
  T object_ = nullptr;
};

using XpcObject = XpcRef<xpc_object_t>;
using XpcConnection = XpcRef<xpc_connection_t>;

// Move-only owner of a CFTypeRef-compatible ref (vmnet_network_ref,
// vmnet_network_configuration_ref).  Never copied: one owner, one CFRelease.
template <typename T>
class CfRef {
 public:
  CfRef() noexcept = default;
  explicit CfRef(T ref) noexcept : ref_(ref) {}  // adopts: vmnet's creators return +1
  ~CfRef() { reset(); }

  CfRef(const CfRef&) = delete;
  CfRef& operator=(const CfRef&) = delete;
  CfRef(CfRef&& other) noexcept : ref_(other.release()) {}
  CfRef& operator=(CfRef&& other) noexcept {
    if (this != &other) {
      reset();
      ref_ = other.release();
    }
    return *this;
  }

  T get() const noexcept { return ref_; }
  explicit operator bool() const noexcept { return ref_ != nullptr; }
  T release() noexcept {
    T ref = ref_;
    ref_ = nullptr;
    return ref;
  }
  // CFRelease(NULL) crashes, unlike xpc_release's callers' habit of checking.
  void reset() noexcept {
    if (ref_ != nullptr) CFRelease(ref_);
    ref_ = nullptr;
  }

 private:
  T ref_ = nullptr;
};

}  // namespace vmb
