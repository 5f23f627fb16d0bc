// TAP devices from /dev/net/tun.
#pragma once

#include <cstddef>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <sys/types.h>

#include "common/unique_fd.hpp"

namespace vmb {

// sizeof(struct virtio_net_hdr_v1): flags, gso_type, hdr_len, gso_size,
// csum_start, csum_offset, num_buffers. (linux/virtio_net.h is not valid C++.)
constexpr std::size_t kVnetHdrLen = 12;
constexpr int kMaxQueues = 16;

// TUNSETOFFLOAD flags for a TAP with or without a vnet header. Offloads need
// the header: without it the reader could not tell a GSO frame from a plain one.
unsigned tap_offload_flags(bool vnet_hdr);

class Tap {
 public:
  // `name` may be a template ("vmb%d"). With `netns` (a path such as
  // /run/netns/NAME) the device is created inside that namespace. All fds
  // are opened or none: on error, whatever was opened is closed again.
  Tap(const std::string& name, bool vnet_hdr, int queues, const std::optional<std::string>& netns);

  Tap(const Tap&) = delete;
  Tap& operator=(const Tap&) = delete;

  const std::string& name() const noexcept { return name_; }
  bool vnet_hdr() const noexcept { return vnet_hdr_; }
  // The queue fds, still owned here; empty once closed.
  std::vector<int> fds() const;
  // Closing the last fd removes the device, unless it was made persistent.
  // Idempotent.
  void close() noexcept;
  // Keep the device after its last fd closes (TUNSETPERSIST), attachable by
  // name (TUNSETIFF) by `owner` and, if given, members of `group`
  // (TUNSETOWNER, TUNSETGROUP), besides CAP_NET_ADMIN. Only RTM_DELLINK
  // removes it then. Needs an open fd: call before close().
  void make_persistent(uid_t owner, std::optional<gid_t> group);

 private:
  void open_queues(const std::string& name, int queues);

  std::string name_;
  bool vnet_hdr_;
  mutable std::mutex mutex_;  // close() may run without the GIL, beside fds()
  std::vector<UniqueFd> fds_;
};

}  // namespace vmb
