// rtnetlink requests for links and addresses, in the calling thread's
// network namespace. Each call opens its own NETLINK_ROUTE socket.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace vmb {

struct Link {
  std::string name;
  int index = 0;
  std::string kind;  // IFLA_INFO_KIND, or "" when the link has none
  int master = 0;    // ifindex of the bridge it is enslaved to, 0 if none
  int mtu = 0;
  std::string mac;  // lowercase "aa:bb:cc:dd:ee:ff"; "" without a link address
  bool up = false;  // IFF_UP
};

struct Route {
  std::string destination;  // "0.0.0.0" or "::" for a default route
  int prefix_len;
  unsigned table;  // RT_TABLE_MAIN 254, RT_TABLE_LOCAL 255, ...
};

struct Address {
  std::string address;  // the local address (IFA_LOCAL, else IFA_ADDRESS)
  int prefix_len;
  std::string ifname;
};

// Creates a bridge (down); `mtu` 0 keeps the kernel default. Returns its ifindex.
int create_bridge(const std::string& name, int mtu);
void set_link_up(const std::string& name, bool up);
// IPv4 or IPv6, chosen by the text; EEXIST if the address is already there.
void add_address(const std::string& name, const std::string& address, int prefix_len);
// Enslaves `name` to `master`; an empty `master` releases it.
void set_master(const std::string& name, const std::string& master);
void set_mtu(const std::string& name, int mtu);
void set_mac(const std::string& name, const std::string& mac);
// ENODEV if the link does not exist.
void delete_link(const std::string& name);
// Puts a link in a link group (IFLA_GROUP).
void set_group(const std::string& name, uint32_t group);
// Deletes every link of `group` in one request; ENODEV if the group is empty.
void delete_group(uint32_t group);
// By ifindex: the link the broker created, whatever name it has now, and
// never another that took its name after it was deleted. ENODEV if gone.
Link get_link(int index);
void delete_link(int index);
void set_group(int index, uint32_t group);
// Enslaves `name` to the bridge of ifindex `master_index` (0 releases it).
void set_master(const std::string& name, int master_index);
// Links whose name starts with `prefix`, in ifindex order.
std::vector<Link> list_links(const std::string& prefix);
// Every route of `family` (AF_INET or AF_INET6) in every table.
std::vector<Route> list_routes(int family);
// Every address of `family`, with the name of its link.
std::vector<Address> list_addresses(int family);

}  // namespace vmb
