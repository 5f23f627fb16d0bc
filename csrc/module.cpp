// vmnet_broker._native: Python bindings for the Linux mechanism.
// Only this file includes pybind11; each binding wraps one C++ call.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/sys_error.hpp"
#include "linux/closer.hpp"
#include "linux/listener.hpp"
#include "linux/monitor.hpp"
#include "linux/netlink.hpp"
#include "linux/pump.hpp"
#include "linux/tap.hpp"

namespace py = pybind11;

namespace {

using nogil = py::call_guard<py::gil_scoped_release>;

// Strong reference kept for the life of the process, like any module global.
PyObject* connection_closed = nullptr;

// Raises type(*args) from the translator, where nothing may throw.
void raise(PyObject* type, PyObject* args) {
  if (args == nullptr) return;  // building the arguments failed; that error stands
  PyObject* exc = PyObject_Call(type, args, nullptr);
  Py_DECREF(args);
  if (exc == nullptr) return;
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc)), exc);
  Py_DECREF(exc);
}

PyObject* text(const char* what) { return PyUnicode_DecodeUTF8(what, static_cast<Py_ssize_t>(strlen(what)), "replace"); }

// SysError -> OSError(errno, "operation: strerror", name). Calling OSError
// itself picks the subclass from errno (FileExistsError, PermissionError,
// BlockingIOError, ...), as PyErr_SetFromErrnoWithFilename does. ENODEV has
// no subclass of its own; a missing link is FileNotFoundError with errno ENODEV.
void translate(std::exception_ptr error) {
  try {
    if (error) std::rethrow_exception(error);
  } catch (const vmb::SysError& e) {
    PyObject* type = e.code() == ENODEV ? PyExc_FileNotFoundError : PyExc_OSError;
    if (e.name().empty()) {
      raise(type, Py_BuildValue("(iN)", e.code(), text(e.what())));
    } else {
      PyObject* name = PyUnicode_DecodeFSDefaultAndSize(e.name().data(), static_cast<Py_ssize_t>(e.name().size()));
      raise(type, Py_BuildValue("(iNN)", e.code(), text(e.what()), name));
    }
  } catch (const vmb::ConnectionClosedError& e) {
    if (e.code() != 0) {
      raise(connection_closed, Py_BuildValue("(iN)", e.code(), text(e.what())));
    } else {
      raise(connection_closed, Py_BuildValue("(N)", text(e.what())));
    }
  }
}

void bind_listener(py::module_& m) {
  m.attr("MAX_MESSAGE") = vmb::kMaxMessage;
  m.attr("MAX_FDS") = vmb::kMaxFds;

  connection_closed = PyErr_NewExceptionWithDoc("vmnet_broker._native.ConnectionClosed",
                                                "The peer closed its end (EOF) or reset the connection.",
                                                PyExc_ConnectionError, nullptr);
  if (connection_closed == nullptr) throw py::error_already_set();
  m.attr("ConnectionClosed") = py::handle(connection_closed);

  py::class_<vmb::Connection>(m, "Connection", "One accepted client connection (non-blocking, close-on-exec).")
      .def_property_readonly("pid", &vmb::Connection::pid)
      .def_property_readonly("uid", &vmb::Connection::uid)
      .def_property_readonly("gid", &vmb::Connection::gid)
      .def("fileno", &vmb::Connection::fileno)
      .def(
          "recv",
          [](vmb::Connection& c) -> std::optional<std::tuple<py::bytes, bool>> {
            std::optional<vmb::Message> message = c.recv();
            if (!message) return std::nullopt;
            return std::make_tuple(py::bytes(message->data), message->truncated);
          },
          "Read one packet: ``(data, truncated)``, or ``None`` if none waits.\n\n"
          "``truncated`` is true when the packet was longer than ``MAX_MESSAGE``\n"
          "(``data`` is then its first ``MAX_MESSAGE`` bytes).  Any fds the\n"
          "client attached are closed on closer threads (``closer_stats``), never\n"
          "here.  Raises ``ConnectionClosed`` on EOF or ECONNRESET.")
      .def(
          "send",
          [](vmb::Connection& c, const py::bytes& data, const std::vector<int>& fds) {
            char* bytes = nullptr;
            Py_ssize_t size = 0;
            if (PyBytes_AsStringAndSize(data.ptr(), &bytes, &size) < 0) throw py::error_already_set();
            c.send(bytes, static_cast<std::size_t>(size), fds);
          },
          py::arg("data"), py::arg("fds") = py::tuple(),
          "Send one packet with ``fds`` attached as ``SCM_RIGHTS``.\n\n"
          "Never blocks: raises ``BlockingIOError`` if the peer's queue is full,\n"
          "``ConnectionClosed`` if the peer is gone (EPIPE/ECONNRESET).")
      .def("close", &vmb::Connection::close,
           "Drop the packets still queued (their fds to the closer) and close\n"
           "the socket on a closer thread; never blocks.  Idempotent.");

  m.def(
      "closer_stats",
      [] {
        vmb::CloserStats s = vmb::closer_stats();
        return std::map<std::string, uint64_t>{{"pending", s.pending}, {"closed", s.closed}, {"threads", s.threads}};
      },
      "The closer threads that close what clients sent: ``pending`` (handed\n"
      "over, not closed yet), ``closed``, ``threads``.");
  m.def("closer_wait_idle", &vmb::closer_wait_idle, py::arg("timeout_ms"), nogil(),
        "Wait until nothing is pending on the closer threads; False on timeout.");
  m.attr("MAX_CLOSER_THREADS") = vmb::kMaxCloserThreads;

  py::class_<vmb::Listener>(m, "Listener",
                            "An ``AF_UNIX``/``SOCK_SEQPACKET`` socket bound at ``path``.\n\n"
                            "The parent directory is created (mode 0755) if missing; a stale socket\n"
                            "file at ``path`` is replaced; the socket file gets ``mode``.  The socket\n"
                            "is non-blocking and close-on-exec.")
      .def(py::init<const std::string&, mode_t, int>(), py::arg("path"), py::arg_v("mode", 0660, "0o660"),
           py::arg("backlog") = 128,
           "``backlog`` above ``/proc/sys/net/core/somaxconn`` is cut to it by the kernel.")
      .def_static("from_fd", &vmb::Listener::adopt, py::arg("fd"),
                  "Adopt an already bound and listening socket (systemd activation).")
      .def_property_readonly("path", &vmb::Listener::path)
      .def("fileno", &vmb::Listener::fileno)
      .def("accept", &vmb::Listener::accept, "Accept one pending connection, or ``None`` if none is waiting.")
      .def("close", &vmb::Listener::close, "Close the socket and unlink the path (if this listener bound it).");
}

void bind_netlink(py::module_& m) {
  py::class_<vmb::Link>(m, "Link", "One network link, as RTM_GETLINK reports it.")
      .def_readonly("name", &vmb::Link::name)
      .def_readonly("index", &vmb::Link::index)
      .def_readonly("kind", &vmb::Link::kind)
      .def_readonly("master", &vmb::Link::master)
      .def_readonly("mtu", &vmb::Link::mtu)
      .def_readonly("mac", &vmb::Link::mac)
      .def_readonly("up", &vmb::Link::up)
      .def("__repr__", [](const vmb::Link& l) {
        return "Link(name=" + py::repr(py::str(l.name)).cast<std::string>() + ", index=" + std::to_string(l.index) +
               ", kind=" + py::repr(py::str(l.kind)).cast<std::string>() + ", master=" + std::to_string(l.master) +
               ", mtu=" + std::to_string(l.mtu) + ", mac='" + l.mac + "', up=" + (l.up ? "True" : "False") + ")";
      });

  m.def("create_bridge", &vmb::create_bridge, py::arg("name"), py::arg("mtu") = 0, nogil(),
        "Create a bridge (down; ``mtu`` 0 keeps the kernel default); its ifindex.");
  m.def("set_link_up", &vmb::set_link_up, py::arg("name"), py::arg("up") = true, nogil());
  m.def("add_address", &vmb::add_address, py::arg("name"), py::arg("address"), py::arg("prefix_len"), nogil(),
        "Add an IPv4 or IPv6 address (family from the text); EEXIST is an error.");
  m.def("set_master", py::overload_cast<const std::string&, const std::string&>(&vmb::set_master), py::arg("name"),
        py::arg("master"), nogil(), "Enslave ``name`` to bridge ``master`` (\"\" releases it).");
  m.def("set_master", py::overload_cast<const std::string&, int>(&vmb::set_master), py::arg("name"),
        py::arg("master"), nogil(), "Enslave ``name`` to the bridge of ifindex ``master`` (0 releases it).");
  m.def("set_mtu", &vmb::set_mtu, py::arg("name"), py::arg("mtu"), nogil());
  m.def("set_mac", &vmb::set_mac, py::arg("name"), py::arg("mac"), nogil());
  m.def("set_group", py::overload_cast<const std::string&, uint32_t>(&vmb::set_group), py::arg("name"),
        py::arg("group"), nogil(), "Put a link in a link group (IFLA_GROUP).");
  m.def("set_group", py::overload_cast<int, uint32_t>(&vmb::set_group), py::arg("index"), py::arg("group"), nogil(),
        "Put the link of ifindex ``index`` in a link group (IFLA_GROUP).");
  m.def("delete_group", &vmb::delete_group, py::arg("group"), nogil(),
        "Delete every link of ``group`` in one batch; ``FileNotFoundError`` if none.");
  m.def("delete_link", py::overload_cast<const std::string&>(&vmb::delete_link), py::arg("name"), nogil(),
        "Delete a link; ``FileNotFoundError`` (ENODEV) if it does not exist.");
  m.def("delete_link", py::overload_cast<int>(&vmb::delete_link), py::arg("index"), nogil(),
        "Delete the link of ifindex ``index``, whatever its name; ``FileNotFoundError`` if it is gone.");
  m.def("get_link", &vmb::get_link, py::arg("index"), nogil(),
        "The link of ifindex ``index``; ``FileNotFoundError`` (ENODEV) if it is gone.");
  m.def("list_links", &vmb::list_links, py::arg("prefix") = "", nogil(),
        "All links whose name starts with ``prefix``, in ifindex order.");
  m.def(
      "list_routes",
      [](int family) {
        std::vector<std::tuple<std::string, int, unsigned>> out;
        for (vmb::Route& r : vmb::list_routes(family)) out.emplace_back(std::move(r.destination), r.prefix_len, r.table);
        return out;
      },
      py::arg("family"), nogil(),
      "``(destination, prefix_len, table)`` of every route in every table\n"
      "(``AF_INET`` or ``AF_INET6``), local and policy tables included.");
  m.def(
      "list_addresses",
      [](int family) {
        std::vector<std::tuple<std::string, int, std::string>> out;
        for (vmb::Address& a : vmb::list_addresses(family))
          out.emplace_back(std::move(a.address), a.prefix_len, std::move(a.ifname));
        return out;
      },
      py::arg("family"), nogil(), "``(address, prefix_len, ifname)`` of every address of ``family``.");
}

void bind_monitor(py::module_& m) {
  py::class_<vmb::Monitor>(m, "Monitor",
                           "A netlink socket subscribed to link, IPv4/IPv6 address and IPv4/IPv6\n"
                           "route changes in this network namespace (non-blocking, close-on-exec).\n\n"
                           "Wait for ``fileno()`` to be readable, then ``drain()``.")
      .def(py::init<int>(), py::arg("receive_buffer") = 4 * 1024 * 1024,
           "``receive_buffer``: bytes that may queue between drains before events are lost.")
      .def("fileno", &vmb::Monitor::fileno)
      .def_property_readonly("closed", &vmb::Monitor::closed)
      .def(
          "drain",
          [](vmb::Monitor& monitor, std::size_t max_events) {
            using Event = std::tuple<std::string, int, std::string, int, std::string, int, unsigned, bool>;
            std::vector<Event> out;
            for (vmb::NetEvent& e : monitor.drain(max_events))
              out.emplace_back(std::move(e.kind), e.index, std::move(e.name), e.family, std::move(e.address),
                               e.prefix_len, e.table, e.up);
            return out;
          },
          py::arg("max_events") = 4096,
          "Queued events, oldest first, never blocking: ``(kind, index, name,\n"
          "family, address, prefix_len, table, up)`` tuples.  ``kind`` is\n"
          "``newlink``/``dellink`` (``index``, ``name``, ``up``), ``newaddr``/``deladdr``\n"
          "(``index``, ``family``, ``address``, ``prefix_len``), ``newroute``/\n"
          "``delroute`` (``family``, destination ``address``, ``prefix_len``, ``table``,\n"
          "output link ``index`` or 0), or ``overrun``: events were lost, read the state\n"
          "afresh.  At most ``max_events``; the rest stay queued.")
      .def("close", &vmb::Monitor::close, "Close the socket (idempotent).");
}

void bind_tap(py::module_& m) {
  m.attr("VNET_HDR_LEN") = vmb::kVnetHdrLen;
  m.def("tap_offload_flags", &vmb::tap_offload_flags, py::arg("vnet_hdr"),
        "TUNSETOFFLOAD flags for a TAP with or without a vnet header (pure).");

  py::class_<vmb::Tap>(m, "Tap",
                       "A TAP device: ``IFF_TAP | IFF_NO_PI`` (+ ``IFF_VNET_HDR``, ``IFF_MULTI_QUEUE``).\n\n"
                       "``name`` may be a template such as ``\"vmb%d\"``; the kernel's chosen name\n"
                       "is in ``.name``.  ``queues`` > 1 opens that many fds on one device.  With\n"
                       "``netns`` (a path such as ``/run/netns/NAME``) the device is created in\n"
                       "that network namespace (from a short-lived native thread that joins it).\n"
                       "fds are non-blocking and close-on-exec.  Unless made persistent, the device\n"
                       "disappears when its last fd is closed, or when deleted by netlink.")
      .def(py::init([](const std::string& name, bool vnet_hdr, int queues, const std::optional<std::string>& netns) {
             py::gil_scoped_release release;  // opening takes RTNL, and may start a thread
             return std::make_unique<vmb::Tap>(name, vnet_hdr, queues, netns);
           }),
           py::arg("name"), py::arg("vnet_hdr") = false, py::arg("queues") = 1, py::arg("netns") = py::none())
      .def_property_readonly("name", &vmb::Tap::name)
      .def_property_readonly("vnet_hdr", &vmb::Tap::vnet_hdr)
      .def("fds", &vmb::Tap::fds, "The queue fds (still owned by this object).")
      .def("close", &vmb::Tap::close, nogil(), "Close every fd this object still owns (idempotent).")
      .def("make_persistent", &vmb::Tap::make_persistent, py::arg("owner"), py::arg("group") = py::none(), nogil(),
           "TUNSETOWNER (and TUNSETGROUP if ``group``), then TUNSETPERSIST: the device\n"
           "outlives its fds, and ``owner`` may attach to it by name; only deleting it\n"
           "by netlink removes it then.  Call while an fd is open.")
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](vmb::Tap& tap, const py::args&) { tap.close(); }, nogil());
}

void bind_pump(py::module_& m) {
  py::class_<vmb::Pump>(m, "Pump",
                        "A native thread moving frames both ways between two fds.\n\n"
                        "Each fd is a TAP (read/write, one frame per call) or a datagram socket\n"
                        "(batched with recvmmsg/sendmmsg).  The fds are dup'ed: the caller keeps\n"
                        "and closes its own.  Frames are copied unchanged (a vnet header, if any,\n"
                        "passes through).  The thread never touches Python objects.")
      .def(py::init<int, int, std::size_t>(), py::arg("a"), py::arg("b"), py::arg("frame_size") = vmb::kMaxFrameSize,
           "Frames longer than ``frame_size`` are dropped (counted); the buffers\n"
           "hold ``pump_batch_frames(frame_size)`` of them.")
      .def("stop", &vmb::Pump::stop, nogil(), "Stop and join the thread (releases the GIL); idempotent.")
      .def_property_readonly("running", &vmb::Pump::running)
      .def(
          "stats",
          [](const vmb::Pump& pump) {
            vmb::PumpStats s = pump.stats();
            return std::map<std::string, uint64_t>{
                {"a_to_b_frames", s.a_to_b_frames},   {"a_to_b_bytes", s.a_to_b_bytes},
                {"a_to_b_drops", s.a_to_b_drops},     {"b_to_a_frames", s.b_to_a_frames},
                {"b_to_a_bytes", s.b_to_a_bytes},     {"b_to_a_drops", s.b_to_a_drops},
                {"buffer_bytes", s.buffer_bytes},     {"buffer_held", s.buffer_held},
                {"buffer_releases", s.buffer_releases}, {"fds_closed", s.fds_closed},
            };
          },
          "Counters: ``a_to_b_frames``, ``a_to_b_bytes``, ``a_to_b_drops``,\n"
          "``b_to_a_frames``, ``b_to_a_bytes``, ``b_to_a_drops``; ``buffer_bytes``\n"
          "(frame buffers mapped), ``buffer_held`` (of those, touched since they\n"
          "were last given back: 0 after a quiet second), ``buffer_releases``,\n"
          "``fds_closed`` (fds that came with frames on a socket end).");
  m.attr("MAX_FRAME_SIZE") = vmb::kMaxFrameSize;
  m.attr("PUMP_BUFFER_BUDGET") = vmb::kBufferBudget;
  m.def("pump_frame_size", &vmb::pump_frame_size, py::arg("mtu"), py::arg("vnet_hdr"),
        "The longest frame on a network of ``mtu`` (pure): the ``frame_size`` for ``Pump``.");
  m.def("pump_batch_frames", &vmb::pump_batch_frames, py::arg("frame_size"),
        "Frames a pump buffers for ``frame_size`` (pure).");
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() =
      "Linux mechanism for vmnet-broker: the Unix seqpacket listener with fd\n"
      "passing, rtnetlink, TAP devices and the frame pump.\n\n"
      "Mechanism only: every name, limit, MAC address and mode comes from the caller.\n"
      "Errors from the kernel are ``OSError`` subclasses carrying ``errno``, a message\n"
      "naming the operation, and ``filename`` set to the object (link name, path).";
  m.attr("PLATFORM") = "linux";
  py::register_local_exception_translator(translate);
  bind_listener(m);
  bind_netlink(m);
  bind_monitor(m);
  bind_tap(m);
  bind_pump(m);
}
