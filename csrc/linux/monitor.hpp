// What changes in the network namespace, whoever changes it: a netlink
// socket subscribed to rtnetlink's link, address and route groups.
//
// The broker creates links and addresses, but root (and other daemons: a
// VPN bringing up its routes) can change them behind its back. The socket is
// non-blocking, so the caller waits for it in its own event loop (fileno)
// and takes what arrived with drain(). Mechanism only: what an event means
// for a network is the caller's business.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "common/unique_fd.hpp"

namespace vmb {

struct NetEvent {
  // "newlink", "dellink", "newaddr", "deladdr", "newroute", "delroute", or
  // "overrun": the socket's queue overflowed (ENOBUFS) or a message was cut
  // short, so events were lost; the caller must read the state afresh.
  std::string kind;
  int index = 0;         // the link (links, addresses); a route's output link (RTA_OIF), 0 if none
  std::string name;      // the link's name (links only)
  int family = 0;        // AF_INET or AF_INET6 (addresses, routes)
  std::string address;   // the address (IFA_LOCAL, else IFA_ADDRESS), or a route's destination
  int prefix_len = 0;    // addresses, routes
  unsigned table = 0;    // routes: RTA_TABLE (RT_TABLE_MAIN 254, RT_TABLE_LOCAL 255, ...)
  bool up = false;       // links: IFF_UP
};

// Groups joined: RTNLGRP_LINK, RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV6_IFADDR,
// RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV6_ROUTE.
class Monitor {
 public:
  // `receive_buffer` bytes of socket buffer (SO_RCVBUFFORCE when allowed,
  // else SO_RCVBUF, which the kernel caps at net.core.rmem_max): what may
  // pile up between two drains before events are lost.
  explicit Monitor(int receive_buffer);

  int fileno() const { return fd_.get(); }
  bool closed() const { return !fd_; }

  // Every event queued, oldest first, at most `max_events` (the rest stay
  // queued: the fd stays readable). Never blocks. Lost events show as one
  // "overrun". Throws SysError on any other socket error, or after close().
  std::vector<NetEvent> drain(std::size_t max_events);

  void close() { fd_.reset(); }

 private:
  UniqueFd fd_;
};

}  // namespace vmb
