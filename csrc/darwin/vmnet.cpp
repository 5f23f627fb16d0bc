#include "darwin/vmnet.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>
#include <limits>

#include "common/sys_error.hpp"
#include "darwin/error.hpp"
#include "darwin/queue.hpp"

namespace vmb {

namespace {

// The one queue every vmnet call runs on.  Leaked on purpose: a static
// destructor at exit could release it while another thread still
// dispatches vmnet work to it.
SerialQueue& vmnet_queue() {
  static SerialQueue* const queue = new SerialQueue("vmnet_broker.vmnet");
  return *queue;
}

// The else branch of every __builtin_available(macOS 26.0, *): the network
// API does not exist before macOS 26.  OSError(ENOTSUP) in Python.
SysError needs_macos26(const char* operation) { return SysError(ENOTSUP, operation, {}, "needs macOS 26"); }

// A creator returned NULL.  vmnet should have set a failure status; if it
// left VMNET_SUCCESS, say VMNET_FAILURE rather than report success.
VmnetError null_result(vmnet_return_t status, const char* operation) {
  return VmnetError(status == VMNET_SUCCESS ? VMNET_FAILURE : status, operation);
}

void check(vmnet_return_t status, const char* operation) {
  if (status != VMNET_SUCCESS) throw VmnetError(status, operation);
}

// -- parsing: everything is checked before the first vmnet call ------------

std::string quoted(const std::string& text) { return "'" + text + "'"; }

in_addr parse_ipv4(const std::string& text, const char* what) {
  in_addr address{};
  if (::inet_pton(AF_INET, text.c_str(), &address) != 1 || text.find('\0') != std::string::npos)
    throw InvalidValue(std::string(what) + ": not an IPv4 address: " + quoted(text));
  return address;
}

in6_addr parse_ipv6(const std::string& text, const char* what) {
  in6_addr address{};
  if (::inet_pton(AF_INET6, text.c_str(), &address) != 1 || text.find('\0') != std::string::npos)
    throw InvalidValue(std::string(what) + ": not an IPv6 address: " + quoted(text));
  return address;
}

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Exactly six two-digit hex groups joined by ':'.  Shorter groups or other
// separators are more likely a typo than intent, and a group (multicast)
// address never is a DHCP client's, so both are refused.
ether_addr_t parse_mac(const std::string& text) {
  ether_addr_t mac{};
  bool ok = text.size() == 17;
  for (std::size_t i = 0; ok && i < 6; ++i) {
    int high = hex_digit(text[i * 3]);
    int low = hex_digit(text[i * 3 + 1]);
    ok = high >= 0 && low >= 0 && (i == 5 || text[i * 3 + 2] == ':');
    mac.octet[i] = static_cast<u_char>(high * 16 + low);
  }
  if (!ok) throw InvalidValue("dhcp reservation: not a MAC address (aa:bb:cc:dd:ee:ff): " + quoted(text));
  if (mac.octet[0] & 1) throw InvalidValue("dhcp reservation: multicast MAC address: " + quoted(text));
  return mac;
}

std::int64_t in_range(std::int64_t value, std::int64_t low, std::int64_t high, const char* what) {
  if (value < low || value > high)
    throw InvalidValue(std::string(what) + " " + std::to_string(value) + " outside " + std::to_string(low) + ".." +
                       std::to_string(high));
  return value;
}

std::uint16_t port(std::int64_t value, const char* what) { return static_cast<std::uint16_t>(in_range(value, 1, 65535, what)); }

struct ParsedForward {
  std::uint8_t protocol;
  sa_family_t family;
  std::uint16_t external_port;
  std::uint16_t internal_port;
  in_addr ipv4;   // family AF_INET
  in6_addr ipv6;  // family AF_INET6
};

struct ParsedReservation {
  ether_addr_t mac;
  in_addr address;
};

// NetworkOptions in the binary form vmnet takes.
struct Parsed {
  vmnet_mode_t mode;
  bool has_subnet = false;
  in_addr subnet{};
  in_addr mask{};
  bool has_ipv6_prefix = false;
  in6_addr ipv6_prefix{};
  std::uint8_t ipv6_prefix_len = 0;
  std::uint32_t mtu = 0;
  std::vector<ParsedForward> forwards;
  std::vector<ParsedReservation> reservations;
};

ParsedForward parse_forward(const PortForward& rule) {
  ParsedForward out{};
  if (rule.protocol == "tcp") {
    out.protocol = IPPROTO_TCP;
  } else if (rule.protocol == "udp") {
    out.protocol = IPPROTO_UDP;
  } else {
    throw InvalidValue("port forward: protocol is not 'tcp' or 'udp': " + quoted(rule.protocol));
  }
  out.external_port = port(rule.external_port, "port forward: external port");
  out.internal_port = port(rule.internal_port, "port forward: internal port");
  // The family follows the address text; vmnet reads the address as an
  // in_addr or in6_addr accordingly.
  if (rule.internal_address.find(':') == std::string::npos) {
    out.family = AF_INET;
    out.ipv4 = parse_ipv4(rule.internal_address, "port forward: internal address");
  } else {
    out.family = AF_INET6;
    out.ipv6 = parse_ipv6(rule.internal_address, "port forward: internal address");
  }
  return out;
}

Parsed parse(const NetworkOptions& options) {
  Parsed p{};
  p.mode = static_cast<vmnet_mode_t>(in_range(options.mode, 0, std::numeric_limits<std::uint32_t>::max(), "mode"));
  if (options.subnet.has_value() != options.mask.has_value()) throw InvalidValue("subnet and mask go together");
  if (options.subnet) {
    p.has_subnet = true;
    p.subnet = parse_ipv4(*options.subnet, "subnet");
    p.mask = parse_ipv4(*options.mask, "mask");
  }
  if (options.ipv6_prefix) {
    p.has_ipv6_prefix = true;
    p.ipv6_prefix = parse_ipv6(*options.ipv6_prefix, "ipv6 prefix");
    p.ipv6_prefix_len = static_cast<std::uint8_t>(in_range(options.ipv6_prefix_len, 1, 128, "ipv6 prefix length"));
  } else if (options.ipv6_prefix_len != 0) {
    throw InvalidValue("ipv6 prefix length without an ipv6 prefix");
  }
  p.mtu = static_cast<std::uint32_t>(in_range(options.mtu, 0, std::numeric_limits<std::uint32_t>::max(), "mtu"));
  if (options.external_interface && options.external_interface->find('\0') != std::string::npos)
    throw InvalidValue("external interface name contains NUL");
  for (const PortForward& rule : options.port_forwards) p.forwards.push_back(parse_forward(rule));
  for (const DhcpReservation& r : options.dhcp_reservations)
    p.reservations.push_back({parse_mac(r.mac), parse_ipv4(r.address, "dhcp reservation: address")});
  return p;
}

std::string ntop(int family, const void* address) {
  char text[INET6_ADDRSTRLEN] = {};
  if (::inet_ntop(family, address, text, sizeof text) == nullptr) throw_errno("inet_ntop");
  return text;
}

}  // namespace

std::string vmnet_status_name(std::int64_t status) {
  switch (status) {
    case VMNET_SUCCESS: return "VMNET_SUCCESS";
    case VMNET_FAILURE: return "VMNET_FAILURE";
    case VMNET_MEM_FAILURE: return "VMNET_MEM_FAILURE";
    case VMNET_INVALID_ARGUMENT: return "VMNET_INVALID_ARGUMENT";
    case VMNET_SETUP_INCOMPLETE: return "VMNET_SETUP_INCOMPLETE";
    case VMNET_INVALID_ACCESS: return "VMNET_INVALID_ACCESS";
    case VMNET_PACKET_TOO_BIG: return "VMNET_PACKET_TOO_BIG";
    case VMNET_BUFFER_EXHAUSTED: return "VMNET_BUFFER_EXHAUSTED";
    case VMNET_TOO_MANY_PACKETS: return "VMNET_TOO_MANY_PACKETS";
    case VMNET_SHARING_SERVICE_BUSY: return "VMNET_SHARING_SERVICE_BUSY";
    case VMNET_NOT_AUTHORIZED: return "VMNET_NOT_AUTHORIZED";
    default: return "VMNET_STATUS_" + std::to_string(status);
  }
}

VmnetError::VmnetError(std::int64_t status, std::string operation)
    : std::runtime_error(operation + ": " + vmnet_status_name(status) + " (" + std::to_string(status) + ")"),
      status_(status),
      status_name_(vmnet_status_name(status)),
      operation_(std::move(operation)) {}

std::unique_ptr<VmnetNetwork> create_network(const NetworkOptions& options) {
  const Parsed p = parse(options);
  std::unique_ptr<VmnetNetwork> result;
  // Everything made here is also released here, on the vmnet queue, if a
  // later step fails.
  vmnet_queue().sync([&] {
    if (__builtin_available(macOS 26.0, *)) {
      vmnet_return_t status = VMNET_FAILURE;
      CfRef<vmnet_network_configuration_ref> config(vmnet_network_configuration_create(p.mode, &status));
      if (!config) throw null_result(status, "vmnet_network_configuration_create");
      if (p.has_subnet)
        check(vmnet_network_configuration_set_ipv4_subnet(config.get(), &p.subnet, &p.mask),
              "vmnet_network_configuration_set_ipv4_subnet");
      if (p.has_ipv6_prefix)
        check(vmnet_network_configuration_set_ipv6_prefix(config.get(), &p.ipv6_prefix, p.ipv6_prefix_len),
              "vmnet_network_configuration_set_ipv6_prefix");
      if (p.mtu != 0)
        check(vmnet_network_configuration_set_mtu(config.get(), p.mtu), "vmnet_network_configuration_set_mtu");
      if (options.external_interface)
        check(vmnet_network_configuration_set_external_interface(config.get(), options.external_interface->c_str()),
              "vmnet_network_configuration_set_external_interface");
      if (!options.nat44) vmnet_network_configuration_disable_nat44(config.get());
      if (!options.nat66) vmnet_network_configuration_disable_nat66(config.get());
      if (!options.dhcp) vmnet_network_configuration_disable_dhcp(config.get());
      if (!options.dns_proxy) vmnet_network_configuration_disable_dns_proxy(config.get());
      if (!options.router_advertisement) vmnet_network_configuration_disable_router_advertisement(config.get());
      for (const ParsedForward& f : p.forwards) {
        // Ports in host byte order, as vmnet takes them.
        const void* address = f.family == AF_INET ? static_cast<const void*>(&f.ipv4) : &f.ipv6;
        check(vmnet_network_configuration_add_port_forwarding_rule(config.get(), f.protocol, f.family, f.internal_port,
                                                                   f.external_port, address),
              "vmnet_network_configuration_add_port_forwarding_rule");
      }
      for (const ParsedReservation& r : p.reservations)
        check(vmnet_network_configuration_add_dhcp_reservation(config.get(), &r.mac, &r.address),
              "vmnet_network_configuration_add_dhcp_reservation");

      status = VMNET_FAILURE;
      CfRef<vmnet_network_ref> network(vmnet_network_create(config.get(), &status));
      if (!network) throw null_result(status, "vmnet_network_create");
      status = VMNET_FAILURE;
      XpcObject serialization = XpcObject::adopt(vmnet_network_copy_serialization(network.get(), &status));
      if (!serialization) throw null_result(status, "vmnet_network_copy_serialization");
      result = std::make_unique<VmnetNetwork>(std::move(network), std::move(serialization));
    } else {
      throw needs_macos26("vmnet_network_configuration_create");
    }
  });
  return result;
}

std::unique_ptr<VmnetNetwork> network_from_serialization(const XpcObject& serialization) {
  if (!serialization) throw InvalidValue("empty serialization");
  std::unique_ptr<VmnetNetwork> result;
  vmnet_queue().sync([&] {
    if (__builtin_available(macOS 26.0, *)) {
      vmnet_return_t status = VMNET_FAILURE;
      CfRef<vmnet_network_ref> network(vmnet_network_create_with_serialization(serialization.get(), &status));
      if (!network) throw null_result(status, "vmnet_network_create_with_serialization");
      result = std::make_unique<VmnetNetwork>(std::move(network), serialization);
    } else {
      throw needs_macos26("vmnet_network_create_with_serialization");
    }
  });
  return result;
}

vmnet_network_ref VmnetNetwork::checked(const char* operation) const {
  if (!network_) throw SysError(EBADF, operation, {}, "network closed");
  return network_.get();
}

XpcObject VmnetNetwork::serialization() const {
  std::lock_guard<std::mutex> lock(mutex_);
  checked("serialization");
  return serialization_;
}

std::uintptr_t VmnetNetwork::pointer() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return reinterpret_cast<std::uintptr_t>(checked("pointer"));
}

std::pair<std::string, std::string> VmnetNetwork::ipv4_subnet() const {
  constexpr const char* operation = "vmnet_network_get_ipv4_subnet";
  std::lock_guard<std::mutex> lock(mutex_);
  vmnet_network_ref network = checked(operation);
  in_addr address{}, mask{};
  vmnet_queue().sync([&] {
    if (__builtin_available(macOS 26.0, *)) {
      vmnet_network_get_ipv4_subnet(network, &address, &mask);
    } else {
      throw needs_macos26(operation);
    }
  });
  return {ntop(AF_INET, &address), ntop(AF_INET, &mask)};
}

std::pair<std::string, int> VmnetNetwork::ipv6_prefix() const {
  constexpr const char* operation = "vmnet_network_get_ipv6_prefix";
  std::lock_guard<std::mutex> lock(mutex_);
  vmnet_network_ref network = checked(operation);
  in6_addr prefix{};
  std::uint8_t len = 0;
  vmnet_queue().sync([&] {
    if (__builtin_available(macOS 26.0, *)) {
      vmnet_network_get_ipv6_prefix(network, &prefix, &len);
    } else {
      throw needs_macos26(operation);
    }
  });
  if (len == 0) return {"", 0};
  return {ntop(AF_INET6, &prefix), len};
}

void VmnetNetwork::close() noexcept {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!network_ && !serialization_) return;
  // Released on the vmnet queue like every other vmnet call.  reset()
  // cannot throw, so neither can sync() here.
  vmnet_queue().sync([&]() noexcept {
    network_.reset();
    serialization_.reset();
  });
}

}  // namespace vmb
