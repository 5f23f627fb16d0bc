#include "linux/monitor.hpp"

#include <arpa/inet.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "common/sys_error.hpp"

namespace vmb {

namespace {

// One multicast message is one skb; none comes near this (a link message
// with every attribute is a few KiB). A longer one is reported as "overrun".
constexpr std::size_t kRecvBuffer = 65536;

constexpr unsigned kGroups[] = {RTNLGRP_LINK, RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV6_IFADDR, RTNLGRP_IPV4_ROUTE,
                                RTNLGRP_IPV6_ROUTE};

std::string address_text(int family, const void* data, std::size_t len) {
  unsigned char raw[sizeof(in6_addr)] = {};
  std::size_t size = family == AF_INET ? sizeof(in_addr) : sizeof(in6_addr);
  if (data != nullptr) std::memcpy(raw, data, std::min(len, size));
  char text[INET6_ADDRSTRLEN];
  return ::inet_ntop(family, raw, text, sizeof text) ? text : "";
}

uint32_t attr_u32(const rtattr* attr) {
  uint32_t value = 0;
  if (RTA_PAYLOAD(attr) >= sizeof value) std::memcpy(&value, RTA_DATA(attr), sizeof value);
  return value;
}

bool parse_link(const nlmsghdr* h, NetEvent& event) {
  if (h->nlmsg_len < NLMSG_LENGTH(sizeof(ifinfomsg))) return false;
  auto* info = static_cast<const ifinfomsg*>(NLMSG_DATA(h));
  event.kind = h->nlmsg_type == RTM_NEWLINK ? "newlink" : "dellink";
  event.index = info->ifi_index;
  event.up = info->ifi_flags & IFF_UP;
  int len = static_cast<int>(IFLA_PAYLOAD(h));
  for (auto* a = IFLA_RTA(info); RTA_OK(a, len); a = RTA_NEXT(a, len)) {
    if ((a->rta_type & NLA_TYPE_MASK) == IFLA_IFNAME) {
      const char* text = static_cast<const char*>(RTA_DATA(a));
      event.name.assign(text, strnlen(text, RTA_PAYLOAD(a)));
    }
  }
  return true;
}

bool parse_address(const nlmsghdr* h, NetEvent& event) {
  if (h->nlmsg_len < NLMSG_LENGTH(sizeof(ifaddrmsg))) return false;
  auto* ifa = static_cast<const ifaddrmsg*>(NLMSG_DATA(h));
  if (ifa->ifa_family != AF_INET && ifa->ifa_family != AF_INET6) return false;
  event.kind = h->nlmsg_type == RTM_NEWADDR ? "newaddr" : "deladdr";
  event.index = static_cast<int>(ifa->ifa_index);
  event.family = ifa->ifa_family;
  event.prefix_len = ifa->ifa_prefixlen;
  // IFA_LOCAL is this host's address; IFA_ADDRESS the peer's on a
  // point-to-point link and the same address everywhere else.
  std::string local, address;
  int len = static_cast<int>(IFA_PAYLOAD(h));
  for (auto* a = IFA_RTA(ifa); RTA_OK(a, len); a = RTA_NEXT(a, len)) {
    switch (a->rta_type & NLA_TYPE_MASK) {
      case IFA_LOCAL:
        local = address_text(ifa->ifa_family, RTA_DATA(a), RTA_PAYLOAD(a));
        break;
      case IFA_ADDRESS:
        address = address_text(ifa->ifa_family, RTA_DATA(a), RTA_PAYLOAD(a));
        break;
      default:
        break;
    }
  }
  event.address = local.empty() ? address : local;
  return true;
}

bool parse_route(const nlmsghdr* h, NetEvent& event) {
  if (h->nlmsg_len < NLMSG_LENGTH(sizeof(rtmsg))) return false;
  auto* rt = static_cast<const rtmsg*>(NLMSG_DATA(h));
  if (rt->rtm_family != AF_INET && rt->rtm_family != AF_INET6) return false;
  if (rt->rtm_flags & RTM_F_CLONED) return false;  // a cache entry, not a route anyone added
  event.kind = h->nlmsg_type == RTM_NEWROUTE ? "newroute" : "delroute";
  event.family = rt->rtm_family;
  event.prefix_len = rt->rtm_dst_len;
  event.table = rt->rtm_table;
  event.address = address_text(rt->rtm_family, nullptr, 0);  // no RTA_DST: a default route
  int len = static_cast<int>(RTM_PAYLOAD(h));
  for (auto* a = RTM_RTA(rt); RTA_OK(a, len); a = RTA_NEXT(a, len)) {
    switch (a->rta_type & NLA_TYPE_MASK) {
      case RTA_DST:
        event.address = address_text(rt->rtm_family, RTA_DATA(a), RTA_PAYLOAD(a));
        break;
      case RTA_TABLE:  // rtm_table is only 8 bits; this is the real id
        event.table = attr_u32(a);
        break;
      case RTA_OIF:
        event.index = static_cast<int>(attr_u32(a));
        break;
      default:
        break;
    }
  }
  return true;
}

NetEvent overrun() {
  NetEvent event;
  event.kind = "overrun";
  return event;
}

}  // namespace

Monitor::Monitor(int receive_buffer)
    : fd_(::socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC | SOCK_NONBLOCK, NETLINK_ROUTE)) {
  if (!fd_) throw_errno("netlink monitor socket");
  if (receive_buffer > 0 &&
      ::setsockopt(fd_.get(), SOL_SOCKET, SO_RCVBUFFORCE, &receive_buffer, sizeof receive_buffer) < 0) {
    // Not CAP_NET_ADMIN: the ordinary option, capped by rmem_max.
    ::setsockopt(fd_.get(), SOL_SOCKET, SO_RCVBUF, &receive_buffer, sizeof receive_buffer);
  }
  sockaddr_nl addr{};
  addr.nl_family = AF_NETLINK;
  if (::bind(fd_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0) throw_errno("netlink monitor bind");
  for (unsigned group : kGroups) {
    if (::setsockopt(fd_.get(), SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &group, sizeof group) < 0)
      throw_errno("netlink monitor: join group " + std::to_string(group));
  }
}

std::vector<NetEvent> Monitor::drain(std::size_t max_events) {
  if (!fd_) throw SysError(EBADF, "netlink monitor: drain after close");
  std::vector<NetEvent> events;
  std::vector<char> buf(kRecvBuffer);
  bool lost = false;
  // Bounded by reads as well as events: messages that make no event (other
  // families, ENOBUFS) must not keep the caller's loop here either.
  for (std::size_t reads = 0; reads < max_events && events.size() < max_events; ++reads) {
    sockaddr_nl from{};
    iovec iov{buf.data(), buf.size()};
    msghdr msg{};
    msg.msg_name = &from;
    msg.msg_namelen = sizeof from;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    ssize_t n = ::recvmsg(fd_.get(), &msg, MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      if (errno == ENOBUFS) {  // the kernel dropped events; the socket goes on
        lost = true;
        continue;
      }
      throw_errno("netlink monitor: recv");
    }
    if (msg.msg_flags & MSG_TRUNC) {
      lost = true;
      continue;
    }
    if (from.nl_pid != 0) continue;  // only the kernel speaks for the namespace
    int left = static_cast<int>(n);
    for (auto* h = reinterpret_cast<nlmsghdr*>(buf.data()); NLMSG_OK(h, left); h = NLMSG_NEXT(h, left)) {
      NetEvent event;
      bool parsed = false;
      switch (h->nlmsg_type) {
        case RTM_NEWLINK:
        case RTM_DELLINK:
          parsed = parse_link(h, event);
          break;
        case RTM_NEWADDR:
        case RTM_DELADDR:
          parsed = parse_address(h, event);
          break;
        case RTM_NEWROUTE:
        case RTM_DELROUTE:
          parsed = parse_route(h, event);
          break;
        default:
          break;
      }
      if (parsed) events.push_back(std::move(event));
    }
  }
  // Last: the caller reads the state afresh after the rest, so what it reads
  // is newer than every event it applied.
  if (lost) events.push_back(overrun());
  return events;
}

}  // namespace vmb
