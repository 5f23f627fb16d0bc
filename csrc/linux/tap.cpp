#include "linux/tap.hpp"

#include <fcntl.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <sched.h>
#include <sys/ioctl.h>

#include <cstring>
#include <exception>
#include <thread>

#include "common/sys_error.hpp"

namespace vmb {

unsigned tap_offload_flags(bool vnet_hdr) { return vnet_hdr ? TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 : 0; }

Tap::Tap(const std::string& name, bool vnet_hdr, int queues, const std::optional<std::string>& netns)
    : vnet_hdr_(vnet_hdr) {
  if (queues < 1 || queues > kMaxQueues) throw SysError(EINVAL, "create tap: queues must be 1.." + std::to_string(kMaxQueues), name);
  if (name.size() >= IFNAMSIZ) throw SysError(EINVAL, "create tap: name too long", name);

  if (!netns) {
    open_queues(name, queues);
    return;
  }
  // setns() moves only the calling thread, so a short-lived thread joins the
  // namespace and creates the device there; this thread never moves.
  std::exception_ptr error;
  std::thread worker([&] {
    try {
      UniqueFd ns(::open(netns->c_str(), O_RDONLY | O_CLOEXEC));
      if (!ns) throw_errno("open netns", *netns);
      if (::setns(ns.get(), CLONE_NEWNET) < 0) throw_errno("setns", *netns);
      open_queues(name, queues);
    } catch (...) {
      error = std::current_exception();
    }
  });
  worker.join();
  if (error) std::rethrow_exception(error);
}

void Tap::open_queues(const std::string& name, int queues) {
  std::vector<UniqueFd> opened;
  std::string chosen = name;
  for (int i = 0; i < queues; ++i) {
    UniqueFd fd(::open("/dev/net/tun", O_RDWR | O_CLOEXEC | O_NONBLOCK));
    if (!fd) throw_errno("open /dev/net/tun", name);

    ifreq ifr{};
    std::memcpy(ifr.ifr_name, chosen.data(), chosen.size());  // size checked < IFNAMSIZ
    int flags = IFF_TAP | IFF_NO_PI;
    if (vnet_hdr_) flags |= IFF_VNET_HDR;
    if (queues > 1) flags |= IFF_MULTI_QUEUE;
    // The first open must create the device, never attach to someone else's;
    // later ones attach further queues to it by its real name.
    if (i == 0) flags |= IFF_TUN_EXCL;
    ifr.ifr_flags = static_cast<short>(flags);
    if (::ioctl(fd.get(), TUNSETIFF, &ifr) < 0) {
      // IFF_TUN_EXCL reports an existing name as EBUSY; callers expect EEXIST.
      int code = (i == 0 && errno == EBUSY) ? EEXIST : errno;
      throw SysError(code, "TUNSETIFF", name);
    }
    if (i == 0) chosen.assign(ifr.ifr_name, strnlen(ifr.ifr_name, IFNAMSIZ));

    if (vnet_hdr_) {
      int size = static_cast<int>(kVnetHdrLen);
      if (::ioctl(fd.get(), TUNSETVNETHDRSZ, &size) < 0) throw_errno("TUNSETVNETHDRSZ", chosen);
      if (::ioctl(fd.get(), TUNSETOFFLOAD, static_cast<unsigned long>(tap_offload_flags(true))) < 0)
        throw_errno("TUNSETOFFLOAD", chosen);
    }
    opened.push_back(std::move(fd));
  }
  name_ = chosen;
  std::lock_guard<std::mutex> lock(mutex_);
  fds_ = std::move(opened);
}

std::vector<int> Tap::fds() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<int> out;
  for (const UniqueFd& fd : fds_) out.push_back(fd.get());
  return out;
}

void Tap::make_persistent(uid_t owner, std::optional<gid_t> group) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (fds_.empty()) throw SysError(EBADF, "make persistent: the TAP is closed", name_);
  int fd = fds_.front().get();
  // Persistence last: if setting the owner fails, the device still goes
  // with its fds.
  if (::ioctl(fd, TUNSETOWNER, static_cast<unsigned long>(owner)) < 0) throw_errno("TUNSETOWNER", name_);
  if (group && ::ioctl(fd, TUNSETGROUP, static_cast<unsigned long>(*group)) < 0) throw_errno("TUNSETGROUP", name_);
  if (::ioctl(fd, TUNSETPERSIST, 1UL) < 0) throw_errno("TUNSETPERSIST", name_);
}

void Tap::close() noexcept {
  std::vector<UniqueFd> closing;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    closing.swap(fds_);
  }
  // `closing` goes out of scope here: the fds close outside the lock, since
  // the last one unregisters the device and waits for RTNL.
}

}  // namespace vmb
