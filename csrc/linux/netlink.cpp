#include "linux/netlink.hpp"

#include <arpa/inet.h>
#include <linux/if_link.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <stdexcept>

#include "common/sys_error.hpp"
#include "common/unique_fd.hpp"

namespace vmb {

namespace {

// Bigger than any skb the kernel queues for one recv (dumps top out at 32 KiB),
// so MSG_TRUNC never happens in practice; it is still checked.
constexpr std::size_t kRecvBuffer = 65536;
// A link dump restarted this often because links kept changing is returned as is.
constexpr int kDumpAttempts = 5;

// One netlink request being built: header, fixed part, attributes.
class Request {
 public:
  Request(uint16_t type, uint16_t flags) : buf_(NLMSG_HDRLEN, 0) {
    hdr()->nlmsg_type = type;
    hdr()->nlmsg_flags = static_cast<uint16_t>(NLM_F_REQUEST | flags);
  }

  template <class T>
  void put(const T& fixed) {
    std::size_t start = grow(NLMSG_ALIGN(sizeof fixed));
    std::memcpy(&buf_[start], &fixed, sizeof fixed);
  }

  void attr(uint16_t type, const void* data, std::size_t len) {
    std::size_t start = grow(RTA_SPACE(len));
    rtattr header{static_cast<unsigned short>(RTA_LENGTH(len)), type};
    std::memcpy(&buf_[start], &header, sizeof header);
    if (len > 0) std::memcpy(&buf_[start + RTA_LENGTH(0)], data, len);
  }
  void attr_u32(uint16_t type, uint32_t value) { attr(type, &value, sizeof value); }
  void attr_str(uint16_t type, const std::string& value) { attr(type, value.c_str(), value.size() + 1); }

  std::size_t nest_begin(uint16_t type) {
    std::size_t start = buf_.size();
    attr(type, nullptr, 0);
    return start;
  }
  void nest_end(std::size_t start) {
    auto len = static_cast<unsigned short>(buf_.size() - start);
    std::memcpy(&buf_[start] + offsetof(rtattr, rta_len), &len, sizeof len);
  }

  bool is_dump() const { return (hdr_const()->nlmsg_flags & NLM_F_DUMP) == NLM_F_DUMP; }

  const nlmsghdr* finish(uint32_t seq) {
    hdr()->nlmsg_len = static_cast<uint32_t>(buf_.size());
    hdr()->nlmsg_seq = seq;
    return hdr();
  }

 private:
  std::size_t grow(std::size_t len) {
    std::size_t start = buf_.size();
    buf_.resize(start + len, 0);
    return start;
  }
  // vector storage comes from operator new, aligned for nlmsghdr.
  nlmsghdr* hdr() { return reinterpret_cast<nlmsghdr*>(buf_.data()); }
  const nlmsghdr* hdr_const() const { return reinterpret_cast<const nlmsghdr*>(buf_.data()); }

  std::vector<char> buf_;
};

// The kernel's explanation from an extended ACK, if it sent one. `offset`
// is where the attributes start inside `reply`.
std::string ext_ack_message(const nlmsghdr* reply, std::size_t offset) {
  if (!(reply->nlmsg_flags & NLM_F_ACK_TLVS)) return {};
  const char* base = reinterpret_cast<const char*>(reply);
  while (offset + NLA_HDRLEN <= reply->nlmsg_len) {
    nlattr attr;
    std::memcpy(&attr, base + offset, sizeof attr);
    if (attr.nla_len < NLA_HDRLEN || offset + attr.nla_len > reply->nlmsg_len) break;
    if ((attr.nla_type & NLA_TYPE_MASK) == NLMSGERR_ATTR_MSG) {
      const char* text = base + offset + NLA_HDRLEN;
      return std::string(text, strnlen(text, attr.nla_len - NLA_HDRLEN));
    }
    offset += NLA_ALIGN(attr.nla_len);
  }
  return {};
}

class Socket {
 public:
  Socket() : fd_(::socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE)) {
    if (!fd_) throw_errno("netlink socket");
    // Errors without the echoed request, but with the kernel's explanation.
    // Both are optional: old kernels just ignore them.
    int one = 1;
    ::setsockopt(fd_.get(), SOL_NETLINK, NETLINK_CAP_ACK, &one, sizeof one);
    ::setsockopt(fd_.get(), SOL_NETLINK, NETLINK_EXT_ACK, &one, sizeof one);

    sockaddr_nl addr{};
    addr.nl_family = AF_NETLINK;  // nl_pid 0: the kernel picks our port id
    if (::bind(fd_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0) throw_errno("netlink bind");
    socklen_t len = sizeof addr;
    if (::getsockname(fd_.get(), reinterpret_cast<sockaddr*>(&addr), &len) < 0) throw_errno("netlink getsockname");
    port_ = addr.nl_pid;
  }

  // Sends `req` and reads replies until its ACK (or NLMSG_DONE for a dump),
  // handing every other reply to `on_reply`. Throws the kernel's errno as a
  // SysError naming `operation` and `name`. Returns true if a dump was
  // interrupted by concurrent changes and should be repeated.
  //
  // rtnetlink handles a request inside sendmsg(), and continues a dump
  // inside recvmsg(), so the reads below never wait for long.
  bool transact(Request& req, const std::string& operation, const std::string& name,
                const std::function<void(const nlmsghdr*)>& on_reply = {}) {
    uint32_t seq = ++seq_;
    const bool dump = req.is_dump();
    const nlmsghdr* out = req.finish(seq);
    sockaddr_nl kernel{};
    kernel.nl_family = AF_NETLINK;
    while (::sendto(fd_.get(), out, out->nlmsg_len, 0, reinterpret_cast<sockaddr*>(&kernel), sizeof kernel) < 0) {
      if (errno != EINTR) throw_errno(operation + ": netlink send", name);
    }

    std::vector<char> buf(kRecvBuffer);
    bool interrupted = false;
    for (;;) {
      sockaddr_nl from{};
      iovec iov{buf.data(), buf.size()};
      msghdr msg{};
      msg.msg_name = &from;
      msg.msg_namelen = sizeof from;
      msg.msg_iov = &iov;
      msg.msg_iovlen = 1;
      ssize_t n = ::recvmsg(fd_.get(), &msg, 0);
      if (n < 0) {
        if (errno == EINTR) continue;
        throw_errno(operation + ": netlink recv", name);
      }
      if (msg.msg_flags & MSG_TRUNC) throw SysError(EMSGSIZE, operation + ": netlink recv", name);
      if (from.nl_pid != 0) continue;  // only the kernel may answer

      int left = static_cast<int>(n);
      for (auto* r = reinterpret_cast<nlmsghdr*>(buf.data()); NLMSG_OK(r, left); r = NLMSG_NEXT(r, left)) {
        if (r->nlmsg_seq != seq || r->nlmsg_pid != port_) continue;  // not an answer to this request
        if (r->nlmsg_flags & NLM_F_DUMP_INTR) interrupted = true;

        if (r->nlmsg_type == NLMSG_ERROR) {
          if (r->nlmsg_len < NLMSG_LENGTH(sizeof(nlmsgerr))) throw SysError(EBADMSG, operation, name);
          nlmsgerr err;
          std::memcpy(&err, NLMSG_DATA(r), sizeof err);
          if (err.error == 0) return interrupted;  // the ACK
          std::size_t tlv = NLMSG_HDRLEN + NLMSG_ALIGN(sizeof(nlmsgerr));
          if (!(r->nlmsg_flags & NLM_F_CAPPED)) tlv += NLMSG_ALIGN(err.msg.nlmsg_len - NLMSG_HDRLEN);
          throw SysError(-err.error, operation, name, ext_ack_message(r, tlv));
        }
        if (r->nlmsg_type == NLMSG_DONE && dump) {
          // A dump that failed part way carries the errno here.
          int status = 0;
          if (r->nlmsg_len >= NLMSG_LENGTH(sizeof status)) std::memcpy(&status, NLMSG_DATA(r), sizeof status);
          if (status < 0)
            throw SysError(-status, operation, name, ext_ack_message(r, NLMSG_HDRLEN + NLMSG_ALIGN(sizeof status)));
          return interrupted;
        }
        if (r->nlmsg_type < NLMSG_MIN_TYPE) continue;  // NOOP and friends
        if (on_reply) on_reply(r);
      }
    }
  }

 private:
  UniqueFd fd_;
  uint32_t port_ = 0;
  uint32_t seq_ = 0;
};

void check_name(const std::string& name, const std::string& operation) {
  if (name.empty() || name.size() >= IFNAMSIZ) throw SysError(EINVAL, operation + ": bad interface name", name);
}

std::string format_mac(const unsigned char* bytes, std::size_t len) {
  static const char digits[] = "0123456789abcdef";
  std::string text;
  for (std::size_t i = 0; i < len; ++i) {
    if (i > 0) text += ':';
    text += digits[bytes[i] >> 4];
    text += digits[bytes[i] & 0xf];
  }
  return text;
}

std::string attr_string(const rtattr* attr) {
  const char* text = static_cast<const char*>(RTA_DATA(attr));
  return std::string(text, strnlen(text, RTA_PAYLOAD(attr)));
}

uint32_t attr_u32(const rtattr* attr) {
  uint32_t value = 0;
  if (RTA_PAYLOAD(attr) >= sizeof value) std::memcpy(&value, RTA_DATA(attr), sizeof value);
  return value;
}

bool parse_link(const nlmsghdr* reply, Link& link) {
  if (reply->nlmsg_type != RTM_NEWLINK || reply->nlmsg_len < NLMSG_LENGTH(sizeof(ifinfomsg))) return false;
  auto* info = static_cast<ifinfomsg*>(NLMSG_DATA(const_cast<nlmsghdr*>(reply)));
  link = Link{};
  link.index = info->ifi_index;
  link.up = info->ifi_flags & IFF_UP;
  int len = static_cast<int>(IFLA_PAYLOAD(reply));
  for (rtattr* a = IFLA_RTA(info); RTA_OK(a, len); a = RTA_NEXT(a, len)) {
    switch (a->rta_type & NLA_TYPE_MASK) {
      case IFLA_IFNAME:
        link.name = attr_string(a);
        break;
      case IFLA_MTU:
        link.mtu = static_cast<int>(attr_u32(a));
        break;
      case IFLA_MASTER:
        link.master = static_cast<int>(attr_u32(a));
        break;
      case IFLA_ADDRESS:
        link.mac = format_mac(static_cast<const unsigned char*>(RTA_DATA(a)), RTA_PAYLOAD(a));
        break;
      case IFLA_LINKINFO: {
        int inner = static_cast<int>(RTA_PAYLOAD(a));
        for (auto* i = static_cast<rtattr*>(RTA_DATA(a)); RTA_OK(i, inner); i = RTA_NEXT(i, inner)) {
          if ((i->rta_type & NLA_TYPE_MASK) == IFLA_INFO_KIND) link.kind = attr_string(i);
        }
        break;
      }
      default:
        break;
    }
  }
  return true;
}

ifinfomsg link_header() {
  ifinfomsg info{};
  info.ifi_family = AF_UNSPEC;
  return info;
}

// A request addressed to the link `name` (ifindex 0 makes the kernel look the name up).
Request link_request(uint16_t type, uint16_t flags, const std::string& name) {
  Request req(type, static_cast<uint16_t>(NLM_F_ACK | flags));
  req.put(link_header());
  req.attr_str(IFLA_IFNAME, name);
  return req;
}

// A request addressed to the link of ifindex `index` (the kernel ignores any name then).
Request link_request(uint16_t type, uint16_t flags, int index) {
  Request req(type, static_cast<uint16_t>(NLM_F_ACK | flags));
  ifinfomsg info = link_header();
  info.ifi_index = index;
  req.put(info);
  return req;
}

void check_index(int index, const std::string& operation) {
  if (index <= 0) throw SysError(EINVAL, operation + ": bad ifindex", std::to_string(index));
}

int link_index(Socket& sock, const std::string& name) {
  check_name(name, "look up link");
  Request req = link_request(RTM_GETLINK, 0, name);
  req.attr_u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS);
  int index = 0;
  sock.transact(req, "look up link", name, [&](const nlmsghdr* reply) {
    Link link;
    if (parse_link(reply, link)) index = link.index;
  });
  if (index == 0) throw SysError(ENODEV, "look up link", name);
  return index;
}

// Parses "aa:bb:cc:dd:ee:ff" (either case).
std::vector<unsigned char> parse_mac(const std::string& text) {
  std::vector<unsigned char> bytes;
  std::size_t pos = 0;
  auto hex = [&](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  while (bytes.size() < 6) {
    if (pos + 2 > text.size()) break;
    int high = hex(text[pos]), low = hex(text[pos + 1]);
    if (high < 0 || low < 0) break;
    bytes.push_back(static_cast<unsigned char>(high << 4 | low));
    pos += 2;
    if (bytes.size() < 6) {
      if (pos >= text.size() || text[pos] != ':') break;
      ++pos;
    }
  }
  if (bytes.size() != 6 || pos != text.size()) throw std::invalid_argument("invalid MAC address: '" + text + "'");
  return bytes;
}

// Runs a dump, starting over (at most kDumpAttempts times) while the kernel
// flags it as interrupted by concurrent changes. `make` builds the request
// and resets whatever `each` collects.
void dump(Socket& sock, const std::string& operation, const std::function<Request()>& make,
          const std::function<void(const nlmsghdr*)>& each) {
  for (int attempt = 0; attempt < kDumpAttempts; ++attempt) {
    Request req = make();
    if (!sock.transact(req, operation, {}, each)) return;
  }
}

std::vector<Link> dump_links(Socket& sock) {
  std::vector<Link> links;
  dump(
      sock, "list links",
      [&] {
        links.clear();
        Request req(RTM_GETLINK, NLM_F_DUMP);  // a dump ends with NLMSG_DONE, not an ACK
        req.put(link_header());
        req.attr_u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS);
        return req;
      },
      [&](const nlmsghdr* reply) {
        Link link;
        if (parse_link(reply, link)) links.push_back(std::move(link));
      });
  std::sort(links.begin(), links.end(), [](const Link& x, const Link& y) { return x.index < y.index; });
  return links;
}

void check_family(int family, const char* operation) {
  if (family != AF_INET && family != AF_INET6)
    throw std::invalid_argument(std::string(operation) + ": family must be AF_INET or AF_INET6");
}

// inet_ntop of a raw address attribute; the family's zero address when
// `data` is null (a route without RTA_DST is the default route).
std::string address_text(int family, const void* data, std::size_t len) {
  unsigned char raw[sizeof(in6_addr)] = {};
  std::size_t size = family == AF_INET ? sizeof(in_addr) : sizeof(in6_addr);
  if (data != nullptr) std::memcpy(raw, data, std::min(len, size));
  char text[INET6_ADDRSTRLEN];
  return ::inet_ntop(family, raw, text, sizeof text) ? text : "";
}

}  // namespace

int create_bridge(const std::string& name, int mtu) {
  check_name(name, "create bridge");
  if (mtu < 0) throw SysError(EINVAL, "create bridge: negative mtu", name);
  Socket sock;
  Request req = link_request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, name);
  if (mtu > 0) req.attr_u32(IFLA_MTU, static_cast<uint32_t>(mtu));
  std::size_t info = req.nest_begin(IFLA_LINKINFO);
  req.attr_str(IFLA_INFO_KIND, "bridge");
  req.nest_end(info);
  sock.transact(req, "create bridge", name);
  return link_index(sock, name);
}

void set_link_up(const std::string& name, bool up) {
  const char* operation = up ? "set link up" : "set link down";
  check_name(name, operation);
  Socket sock;
  Request req(RTM_SETLINK, NLM_F_ACK);
  ifinfomsg info = link_header();
  info.ifi_change = IFF_UP;
  info.ifi_flags = up ? IFF_UP : 0;
  req.put(info);
  req.attr_str(IFLA_IFNAME, name);
  sock.transact(req, operation, name);
}

void add_address(const std::string& name, const std::string& address, int prefix_len) {
  check_name(name, "add address");
  unsigned char bytes[sizeof(in6_addr)];
  ifaddrmsg header{};
  std::size_t size;
  if (::inet_pton(AF_INET, address.c_str(), bytes) == 1) {
    header.ifa_family = AF_INET;
    size = sizeof(in_addr);
  } else if (::inet_pton(AF_INET6, address.c_str(), bytes) == 1) {
    header.ifa_family = AF_INET6;
    size = sizeof(in6_addr);
    header.ifa_flags = IFA_F_NODAD;  // usable at once, not "tentative" for a second
  } else {
    throw std::invalid_argument("invalid IP address: '" + address + "'");
  }
  if (prefix_len < 0 || prefix_len > static_cast<int>(size * 8))
    throw std::invalid_argument("invalid prefix length " + std::to_string(prefix_len) + " for " + address);
  header.ifa_prefixlen = static_cast<unsigned char>(prefix_len);
  header.ifa_scope = RT_SCOPE_UNIVERSE;

  Socket sock;
  header.ifa_index = static_cast<uint32_t>(link_index(sock, name));
  Request req(RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL);
  req.put(header);
  if (header.ifa_family == AF_INET) {
    req.attr(IFA_LOCAL, bytes, size);
    req.attr(IFA_ADDRESS, bytes, size);
    // The subnet broadcast, as `ip addr add ... brd +` and libvirt set it.
    if (prefix_len < 31) {
      uint32_t addr;
      std::memcpy(&addr, bytes, sizeof addr);
      uint32_t host_mask = prefix_len == 0 ? 0xffffffffu : (1u << (32 - prefix_len)) - 1;
      uint32_t broadcast = htonl(ntohl(addr) | host_mask);
      req.attr(IFA_BROADCAST, &broadcast, sizeof broadcast);
    }
  } else {
    req.attr(IFA_ADDRESS, bytes, size);
  }
  sock.transact(req, "add address " + address + "/" + std::to_string(prefix_len), name);
}

void set_master(const std::string& name, const std::string& master) {
  check_name(name, "set master");
  Socket sock;
  uint32_t master_index = master.empty() ? 0 : static_cast<uint32_t>(link_index(sock, master));
  Request req = link_request(RTM_SETLINK, 0, name);
  req.attr_u32(IFLA_MASTER, master_index);
  sock.transact(req, master.empty() ? "release from master" : "set master " + master, name);
}

void set_mtu(const std::string& name, int mtu) {
  check_name(name, "set mtu");
  if (mtu <= 0) throw SysError(EINVAL, "set mtu: not positive", name);
  Socket sock;
  Request req = link_request(RTM_SETLINK, 0, name);
  req.attr_u32(IFLA_MTU, static_cast<uint32_t>(mtu));
  sock.transact(req, "set mtu", name);
}

void set_mac(const std::string& name, const std::string& mac) {
  check_name(name, "set mac");
  std::vector<unsigned char> bytes = parse_mac(mac);
  Socket sock;
  Request req = link_request(RTM_SETLINK, 0, name);
  req.attr(IFLA_ADDRESS, bytes.data(), bytes.size());
  sock.transact(req, "set mac", name);
}

void delete_link(const std::string& name) {
  check_name(name, "delete link");
  Socket sock;
  Request req = link_request(RTM_DELLINK, 0, name);
  sock.transact(req, "delete link", name);
}

void set_group(const std::string& name, uint32_t group) {
  check_name(name, "set group");
  Socket sock;
  Request req = link_request(RTM_SETLINK, 0, name);
  req.attr_u32(IFLA_GROUP, group);
  sock.transact(req, "set group", name);
}

void delete_group(uint32_t group) {
  // No index and no name: the kernel deletes every link of the group in one
  // batch, paying the unregistration's RCU grace periods once, not per link.
  Socket sock;
  Request req(RTM_DELLINK, static_cast<uint16_t>(NLM_F_ACK));
  req.put(link_header());
  req.attr_u32(IFLA_GROUP, group);
  sock.transact(req, "delete group", "group " + std::to_string(group));
}

Link get_link(int index) {
  check_index(index, "look up link");
  Socket sock;
  Request req = link_request(RTM_GETLINK, 0, index);
  req.attr_u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS);
  Link found;
  sock.transact(req, "look up link", "ifindex " + std::to_string(index), [&](const nlmsghdr* reply) {
    Link link;
    if (parse_link(reply, link) && link.index == index) found = std::move(link);
  });
  if (found.index == 0) throw SysError(ENODEV, "look up link", "ifindex " + std::to_string(index));
  return found;
}

void delete_link(int index) {
  check_index(index, "delete link");
  Socket sock;
  Request req = link_request(RTM_DELLINK, 0, index);
  sock.transact(req, "delete link", "ifindex " + std::to_string(index));
}

void set_group(int index, uint32_t group) {
  check_index(index, "set group");
  Socket sock;
  Request req = link_request(RTM_SETLINK, 0, index);
  req.attr_u32(IFLA_GROUP, group);
  sock.transact(req, "set group", "ifindex " + std::to_string(index));
}

void set_master(const std::string& name, int master_index) {
  check_name(name, "set master");
  if (master_index < 0) throw SysError(EINVAL, "set master: bad ifindex", name);
  Socket sock;
  Request req = link_request(RTM_SETLINK, 0, name);
  req.attr_u32(IFLA_MASTER, static_cast<uint32_t>(master_index));
  sock.transact(req, master_index == 0 ? "release from master" : "set master ifindex " + std::to_string(master_index),
                name);
}

std::vector<Link> list_links(const std::string& prefix) {
  Socket sock;
  std::vector<Link> links = dump_links(sock);
  links.erase(std::remove_if(links.begin(), links.end(),
                             [&](const Link& link) { return link.name.compare(0, prefix.size(), prefix) != 0; }),
              links.end());
  return links;
}

std::vector<Route> list_routes(int family) {
  check_family(family, "list routes");
  Socket sock;
  std::vector<Route> routes;
  dump(
      sock, "list routes",
      [&] {
        routes.clear();
        Request req(RTM_GETROUTE, NLM_F_DUMP);
        rtmsg header{};
        header.rtm_family = static_cast<unsigned char>(family);
        req.put(header);  // no table and no RTM_F_CLONED: every table, no cache entries
        return req;
      },
      [&](const nlmsghdr* reply) {
        if (reply->nlmsg_type != RTM_NEWROUTE || reply->nlmsg_len < NLMSG_LENGTH(sizeof(rtmsg))) return;
        auto* rt = static_cast<rtmsg*>(NLMSG_DATA(const_cast<nlmsghdr*>(reply)));
        if (rt->rtm_family != family) return;
        Route route{address_text(family, nullptr, 0), rt->rtm_dst_len, rt->rtm_table};
        int len = static_cast<int>(RTM_PAYLOAD(reply));
        for (rtattr* a = RTM_RTA(rt); RTA_OK(a, len); a = RTA_NEXT(a, len)) {
          switch (a->rta_type & NLA_TYPE_MASK) {
            case RTA_DST:
              route.destination = address_text(family, RTA_DATA(a), RTA_PAYLOAD(a));
              break;
            case RTA_TABLE:  // rtm_table is only 8 bits; this is the real id
              route.table = attr_u32(a);
              break;
            default:
              break;
          }
        }
        routes.push_back(std::move(route));
      });
  return routes;
}

std::vector<Address> list_addresses(int family) {
  check_family(family, "list addresses");
  Socket sock;
  std::map<int, std::string> names;
  for (const Link& link : dump_links(sock)) names[link.index] = link.name;

  std::vector<Address> addresses;
  dump(
      sock, "list addresses",
      [&] {
        addresses.clear();
        Request req(RTM_GETADDR, NLM_F_DUMP);
        ifaddrmsg header{};
        header.ifa_family = static_cast<unsigned char>(family);
        req.put(header);
        return req;
      },
      [&](const nlmsghdr* reply) {
        if (reply->nlmsg_type != RTM_NEWADDR || reply->nlmsg_len < NLMSG_LENGTH(sizeof(ifaddrmsg))) return;
        auto* ifa = static_cast<ifaddrmsg*>(NLMSG_DATA(const_cast<nlmsghdr*>(reply)));
        if (ifa->ifa_family != family) return;
        // IFA_LOCAL is this host's address; IFA_ADDRESS is the peer's on a
        // point-to-point link and the same address everywhere else.
        std::string local, address;
        int len = static_cast<int>(IFA_PAYLOAD(reply));
        for (rtattr* a = IFA_RTA(ifa); RTA_OK(a, len); a = RTA_NEXT(a, len)) {
          switch (a->rta_type & NLA_TYPE_MASK) {
            case IFA_LOCAL:
              local = address_text(family, RTA_DATA(a), RTA_PAYLOAD(a));
              break;
            case IFA_ADDRESS:
              address = address_text(family, RTA_DATA(a), RTA_PAYLOAD(a));
              break;
            default:
              break;
          }
        }
        auto name = names.find(static_cast<int>(ifa->ifa_index));
        addresses.push_back(Address{local.empty() ? address : local, ifa->ifa_prefixlen,
                                    name != names.end() ? name->second : std::to_string(ifa->ifa_index)});
      });
  return addresses;
}

}  // namespace vmb
