// vmnet networks (macOS 26): create one from options, or re-create one from
// the serialization a broker handed out.  Every vmnet call runs on one
// process-wide serial queue: vmnet's threading rules are undocumented and
// upstream makes all its calls from one serial queue.
#pragma once

#include <vmnet/vmnet.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "darwin/xpc_object.hpp"

namespace vmb {

constexpr std::int64_t kHostMode = VMNET_HOST_MODE;
constexpr std::int64_t kSharedMode = VMNET_SHARED_MODE;

// A vmnet call returned a status other than VMNET_SUCCESS (or NULL).
// what() is "vmnet_network_create: VMNET_SHARING_SERVICE_BUSY (1009)".
class VmnetError : public std::runtime_error {
 public:
  VmnetError(std::int64_t status, std::string operation);

  std::int64_t status() const noexcept { return status_; }
  const std::string& status_name() const noexcept { return status_name_; }
  const std::string& operation() const noexcept { return operation_; }

 private:
  std::int64_t status_;
  std::string status_name_;
  std::string operation_;
};

// The constant's name for a vmnet_return_t value; "VMNET_STATUS_<n>" for a
// value vmnet does not define.
std::string vmnet_status_name(std::int64_t status);

struct PortForward {
  std::string protocol;  // "tcp" or "udp"
  std::int64_t external_port = 0;
  std::string internal_address;  // IPv4 or IPv6
  std::int64_t internal_port = 0;
};

struct DhcpReservation {
  std::string mac;  // "aa:bb:cc:dd:ee:ff"
  std::string address;  // IPv4
};

// Everything the caller chose; unset means vmnet's default.  Numbers are
// kept as the caller gave them and range-checked before any vmnet call.
struct NetworkOptions {
  std::int64_t mode = kSharedMode;  // vmnet_mode_t, passed through
  std::optional<std::string> subnet;  // passed as given to set_ipv4_subnet
  std::optional<std::string> mask;    // required with subnet
  std::optional<std::string> ipv6_prefix;
  std::int64_t ipv6_prefix_len = 0;  // 1..128, required with ipv6_prefix
  std::int64_t mtu = 0;              // 0: vmnet's default
  std::optional<std::string> external_interface;
  bool nat44 = true;
  bool nat66 = true;
  bool dhcp = true;
  bool dns_proxy = true;
  bool router_advertisement = true;
  std::vector<PortForward> port_forwards;
  std::vector<DhcpReservation> dhcp_reservations;
};

// Owns a vmnet_network_ref and the serialization that goes with it.  The
// serialization is made once: every client of a network gets the same one.
class VmnetNetwork {
 public:
  VmnetNetwork(CfRef<vmnet_network_ref> network, XpcObject serialization) noexcept
      : network_(std::move(network)), serialization_(std::move(serialization)) {}
  ~VmnetNetwork() { close(); }

  VmnetNetwork(const VmnetNetwork&) = delete;
  VmnetNetwork& operator=(const VmnetNetwork&) = delete;

  // Each call gives another reference to the same object.
  XpcObject serialization() const;
  // (address, mask), dotted quads.
  std::pair<std::string, std::string> ipv4_subnet() const;
  // (prefix, length); ("", 0) if the network has none.
  std::pair<std::string, int> ipv6_prefix() const;
  // The raw vmnet_network_ref, borrowed.
  std::uintptr_t pointer() const;
  // Releases the network and the serialization; idempotent.
  void close() noexcept;

 private:
  vmnet_network_ref checked(const char* operation) const;

  // Guards the two refs against close() from another thread; held across
  // the vmnet queue, whose blocks never take it.
  mutable std::mutex mutex_;
  CfRef<vmnet_network_ref> network_;
  XpcObject serialization_;
};

// configuration_create, the setters the options ask for, network_create,
// copy_serialization.  InvalidValue for an unparsable address, MAC,
// protocol or out-of-range number (before any vmnet call); VmnetError
// naming the failing call; SysError(ENOTSUP) before macOS 26.
std::unique_ptr<VmnetNetwork> create_network(const NetworkOptions& options);

// vmnet_network_create_with_serialization.  The network keeps a reference
// to `serialization`.
std::unique_ptr<VmnetNetwork> network_from_serialization(const XpcObject& serialization);

}  // namespace vmb
