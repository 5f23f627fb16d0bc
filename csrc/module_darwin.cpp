// vmnet_broker._native: Python bindings for the macOS mechanism.
// Only this file includes pybind11; each binding wraps one C++ call, and
// Value <-> Python conversion lives here so the XPC handlers never need the
// GIL.  The contract is vmnet_broker/_native.pyi (its darwin branch).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <xpc/xpc.h>

#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/sys_error.hpp"
#include "darwin/client.hpp"
#include "darwin/error.hpp"
#include "darwin/listener.hpp"
#include "darwin/value.hpp"
#include "darwin/vmnet.hpp"

namespace py = pybind11;

namespace {

using nogil = py::call_guard<py::gil_scoped_release>;

// Strong references kept for the life of the process, like any module global.
PyObject* vmnet_error = nullptr;
PyObject* xpc_error = nullptr;

PyObject* text(const std::string& what) {
  return PyUnicode_DecodeUTF8(what.data(), static_cast<Py_ssize_t>(what.size()), "replace");
}

// Raises type(*args) and sets `attributes` on it, from the translator where
// nothing may throw.  Steals `args` and every attribute value; a NULL among
// them means building it failed, and that error stands.
void raise(PyObject* type, PyObject* args, std::initializer_list<std::pair<const char*, PyObject*>> attributes = {}) {
  PyObject* exc = args != nullptr ? PyObject_Call(type, args, nullptr) : nullptr;
  Py_XDECREF(args);
  for (const auto& [name, value] : attributes) {
    if (exc != nullptr && (value == nullptr || PyObject_SetAttrString(exc, name, value) < 0)) Py_CLEAR(exc);
    Py_XDECREF(value);
  }
  if (exc == nullptr) return;
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc)), exc);
  Py_DECREF(exc);
}

// VmnetError and XpcError -> the module's exception classes, str() being
// the C++ message, plus their attributes; SysError -> OSError(errno,
// "operation: strerror"[, name]), so Python picks the subclass from errno;
// InvalidValue -> ValueError.
void translate(std::exception_ptr error) {
  try {
    if (error) std::rethrow_exception(error);
  } catch (const vmb::VmnetError& e) {
    raise(vmnet_error, Py_BuildValue("(N)", text(e.what())),
          {{"status", PyLong_FromLongLong(e.status())},
           {"status_name", text(e.status_name())},
           {"operation", text(e.operation())}});
  } catch (const vmb::XpcError& e) {
    raise(xpc_error, Py_BuildValue("(N)", text(e.what())), {{"description", text(e.description())}});
  } catch (const vmb::SysError& e) {
    if (e.name().empty()) {
      raise(PyExc_OSError, Py_BuildValue("(iN)", e.code(), text(e.what())));
    } else {
      PyObject* name = PyUnicode_DecodeFSDefaultAndSize(e.name().data(), static_cast<Py_ssize_t>(e.name().size()));
      raise(PyExc_OSError, Py_BuildValue("(iNN)", e.code(), text(e.what()), name));
    }
  } catch (const vmb::InvalidValue& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  }
}

// -- Value <-> Python ----------------------------------------------------------

py::str decode(const std::string& utf8) {
  // A peer may send invalid UTF-8: replaced with U+FFFD rather than refused.
  PyObject* s = PyUnicode_DecodeUTF8(utf8.data(), static_cast<Py_ssize_t>(utf8.size()), "replace");
  if (s == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(s);
}

py::object to_python(const vmb::Value& value);

py::dict to_python(const vmb::ValueMap& map) {
  py::dict dict;
  for (const auto& [key, item] : map) dict[decode(key)] = to_python(item);
  return dict;
}

py::object to_python(const vmb::Value& value) {
  const auto& v = value.data;
  if (std::holds_alternative<std::monostate>(v)) return py::none();
  if (auto* b = std::get_if<bool>(&v)) return py::bool_(*b);
  if (auto* i = std::get_if<std::int64_t>(&v)) return py::int_(*i);
  if (auto* d = std::get_if<double>(&v)) return py::float_(*d);
  if (auto* s = std::get_if<std::string>(&v)) return decode(*s);
  if (auto* bytes = std::get_if<vmb::Bytes>(&v))
    return py::bytes(reinterpret_cast<const char*>(bytes->data()), bytes->size());
  if (auto* list = std::get_if<vmb::ValueList>(&v)) {
    py::list out(list->size());
    for (std::size_t i = 0; i < list->size(); ++i) out[i] = to_python((*list)[i]);
    return std::move(out);
  }
  if (auto* map = std::get_if<vmb::ValueMap>(&v)) return to_python(*map);
  return py::cast(std::get<vmb::XpcObject>(v));
}

std::string utf8(py::handle text) {
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(text.ptr(), &size);  // UnicodeEncodeError is a ValueError
  if (data == nullptr) throw py::error_already_set();
  return std::string(data, static_cast<std::size_t>(size));
}

// The limits apply here too: the walk must stop on a list that contains
// itself long before to_xpc would.
vmb::Value from_python(py::handle object, int depth) {
  PyObject* o = object.ptr();
  if (o == Py_None) return vmb::Value{};
  if (PyBool_Check(o)) return vmb::Value{o == Py_True};
  if (PyLong_Check(o)) {
    int overflow = 0;
    long long n = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow != 0) throw vmb::InvalidValue("int outside int64");
    if (n == -1 && PyErr_Occurred()) throw py::error_already_set();
    return vmb::Value{static_cast<std::int64_t>(n)};
  }
  if (PyFloat_Check(o)) return vmb::Value{PyFloat_AsDouble(o)};
  if (PyUnicode_Check(o)) return vmb::Value{utf8(object)};
  if (PyBytes_Check(o)) {
    auto* data = reinterpret_cast<const std::uint8_t*>(PyBytes_AS_STRING(o));
    return vmb::Value{vmb::Bytes(data, data + PyBytes_GET_SIZE(o))};
  }
  if (PyList_Check(o) || PyTuple_Check(o)) {
    auto items = py::reinterpret_borrow<py::sequence>(object);
    vmb::check_container(depth, items.size(), "array");
    vmb::ValueList list;
    list.reserve(items.size());
    for (py::handle item : items) list.push_back(from_python(item, depth + 1));
    return vmb::Value{std::move(list)};
  }
  if (PyDict_Check(o)) {
    auto dict = py::reinterpret_borrow<py::dict>(object);
    vmb::check_container(depth, dict.size(), "dictionary");
    vmb::ValueMap map;
    for (auto [key, item] : dict) {
      if (!PyUnicode_Check(key.ptr()))
        throw vmb::InvalidValue(std::string("dictionary key of type ") + Py_TYPE(key.ptr())->tp_name + ", not str");
      map.emplace(utf8(key), from_python(item, depth + 1));
    }
    return vmb::Value{std::move(map)};
  }
  if (py::isinstance<vmb::XpcObject>(object)) return vmb::Value{object.cast<const vmb::XpcObject&>()};
  throw vmb::InvalidValue(std::string("cannot convert ") + Py_TYPE(o)->tp_name + " to XPC");
}

vmb::ValueMap message_from_python(const py::dict& message) {
  return std::get<vmb::ValueMap>(from_python(message, 1).data);
}

// -- bindings -------------------------------------------------------------------

void bind_errors(py::module_& m) {
  vmnet_error = PyErr_NewExceptionWithDoc(
      "vmnet_broker._native.VmnetError",
      "A vmnet call failed: ``status`` (vmnet_return_t), ``status_name``, ``operation``.", PyExc_OSError, nullptr);
  if (vmnet_error == nullptr) throw py::error_already_set();
  m.attr("VmnetError") = py::handle(vmnet_error);

  xpc_error = PyErr_NewExceptionWithDoc(
      "vmnet_broker._native.XpcError",
      "XPC answered with an error object instead of a reply: ``description``.", PyExc_ConnectionError, nullptr);
  if (xpc_error == nullptr) throw py::error_already_set();
  m.attr("XpcError") = py::handle(xpc_error);

  m.def("vmnet_status_name", &vmb::vmnet_status_name, py::arg("status"),
        "The constant's name for a vmnet_return_t value (pure).");
}

void bind_xpc(py::module_& m) {
  py::class_<vmb::XpcObject>(m, "XpcObject",
                             "An owned reference to an XPC object (released when collected).  Opaque:\n"
                             "compared by identity of the underlying object, handed back to XPC or vmnet.")
      .def_property_readonly("type_name", [](const vmb::XpcObject& o) { return vmb::xpc_type_name(o.get()); })
      .def("description", [](const vmb::XpcObject& o) { return vmb::xpc_description(o.get()); },
           "xpc_copy_description of the object (for logs).")
      .def("pointer", [](const vmb::XpcObject& o) { return reinterpret_cast<std::uintptr_t>(o.get()); },
           "The raw ``xpc_object_t`` (borrowed: valid while this object lives).")
      .def("__eq__", [](const vmb::XpcObject& a, const vmb::XpcObject& b) { return a.get() == b.get(); },
           py::is_operator())
      .def("__hash__", [](const vmb::XpcObject& o) { return std::hash<const void*>{}(o.get()); })
      .def("__repr__", [](const vmb::XpcObject& o) {
        return "<XpcObject " + vmb::xpc_type_name(o.get()) + " " +
               std::to_string(reinterpret_cast<std::uintptr_t>(o.get())) + ">";
      });

  m.def("xpc_transaction_begin", [] { xpc_transaction_begin(); },
        "Tell launchd the process has work (EnableTransactions).");
  m.def("xpc_transaction_end", [] { xpc_transaction_end(); });
}

void bind_listener(py::module_& m) {
  py::class_<vmb::XpcEvent>(m, "XpcEvent",
                            "One event from the listener: ``kind`` is \"peer\", \"request\", \"gone\",\n"
                            "\"error\" or \"terminating\".  ``pid``, ``uid`` (euid) and ``gid`` (egid)\n"
                            "are the peer's as read when it connected, on every event of that peer.")
      .def_readonly("kind", &vmb::XpcEvent::kind)
      .def_readonly("peer", &vmb::XpcEvent::peer)
      .def_readonly("pid", &vmb::XpcEvent::pid)
      .def_readonly("uid", &vmb::XpcEvent::uid)
      .def_readonly("gid", &vmb::XpcEvent::gid)
      .def_readonly("request", &vmb::XpcEvent::request)
      .def_property_readonly(
          "message", [](const vmb::XpcEvent& e) { return to_python(e.message); },
          "The request's dictionary as plain values (a new dict each access); {} otherwise.")
      .def_readonly("invalid", &vmb::XpcEvent::invalid)
      .def_readonly("description", &vmb::XpcEvent::description)
      .def("__repr__", [](const vmb::XpcEvent& e) {
        return "XpcEvent(kind=" + py::repr(py::str(e.kind)).cast<std::string>() + ", peer=" + std::to_string(e.peer) +
               ", pid=" + std::to_string(e.pid) + ", request=" + std::to_string(e.request) + ")";
      });

  py::class_<vmb::XpcListener>(m, "XpcListener",
                               "A Mach-service listener on one private serial dispatch queue, activated\n"
                               "on construction.  The handlers only convert and queue events and write a\n"
                               "byte to a pipe (never taking the GIL); ``fileno()`` is the pipe's read end.")
      .def(py::init<std::string>(), py::arg("service_name"))
      .def_property_readonly("service_name", &vmb::XpcListener::service_name)
      .def("fileno", &vmb::XpcListener::fileno, "The pipe's read end: readable while events wait; -1 after close().")
      .def("drain", &vmb::XpcListener::drain, "Every queued event, oldest first (never blocks; [] if none).")
      .def(
          "reply",
          [](vmb::XpcListener& l, std::uint64_t request, const py::dict& message) {
            return l.reply(request, message_from_python(message));
          },
          py::arg("request"), py::arg("message"),
          "Answer a request once (xpc_dictionary_create_reply).  False if it had no reply\n"
          "context, was already answered, or its peer is gone; ValueError if ``message``\n"
          "cannot be converted (nothing sent; the request stays pending).")
      .def("discard", &vmb::XpcListener::discard, py::arg("request"), "Drop a request without answering.")
      .def("cancel_peer", &vmb::XpcListener::cancel_peer, py::arg("peer"),
           "xpc_connection_cancel a peer; a \"gone\" event follows.")
      .def("close", &vmb::XpcListener::close, nogil(),
           "Cancel the listener and every peer, release pending requests, close the pipe;\n"
           "waits for the queue (GIL released).  Idempotent.");
}

void bind_vmnet(py::module_& m) {
  m.attr("VMNET_HOST_MODE") = vmb::kHostMode;
  m.attr("VMNET_SHARED_MODE") = vmb::kSharedMode;

  // Every method waits for the one vmnet queue, which a create_network on
  // another thread may hold: none keeps the GIL meanwhile.
  py::class_<vmb::VmnetNetwork>(m, "VmnetNetwork",
                                "An owned vmnet_network_ref (CFRelease on close or collection), with the\n"
                                "serialization made once at creation.")
      .def("serialization", &vmb::VmnetNetwork::serialization, nogil(),
           "The serialization made at creation (the same object every call).")
      .def("ipv4_subnet", &vmb::VmnetNetwork::ipv4_subnet, nogil(), "``(address, mask)``, dotted quads.")
      .def("ipv6_prefix", &vmb::VmnetNetwork::ipv6_prefix, nogil(), "``(prefix, length)``; (\"\", 0) if none.")
      .def("pointer", &vmb::VmnetNetwork::pointer, nogil(), "The raw ``vmnet_network_ref`` (borrowed).")
      .def("close", &vmb::VmnetNetwork::close, nogil(), "Release the network and its serialization; idempotent.");

  using Forward = std::tuple<std::string, std::int64_t, std::string, std::int64_t>;
  using Reservation = std::tuple<std::string, std::string>;
  m.def(
      "create_network",
      [](std::int64_t mode, std::optional<std::string> subnet, std::optional<std::string> mask,
         std::optional<std::string> ipv6_prefix, std::int64_t ipv6_prefix_len, std::int64_t mtu,
         std::optional<std::string> external_interface, bool nat44, bool nat66, bool dhcp, bool dns_proxy,
         bool router_advertisement, const std::vector<Forward>& port_forwards,
         const std::vector<Reservation>& dhcp_reservations) {
        vmb::NetworkOptions options;
        options.mode = mode;
        options.subnet = std::move(subnet);
        options.mask = std::move(mask);
        options.ipv6_prefix = std::move(ipv6_prefix);
        options.ipv6_prefix_len = ipv6_prefix_len;
        options.mtu = mtu;
        options.external_interface = std::move(external_interface);
        options.nat44 = nat44;
        options.nat66 = nat66;
        options.dhcp = dhcp;
        options.dns_proxy = dns_proxy;
        options.router_advertisement = router_advertisement;
        for (const auto& [protocol, external_port, internal_address, internal_port] : port_forwards)
          options.port_forwards.push_back({protocol, external_port, internal_address, internal_port});
        for (const auto& [mac, address] : dhcp_reservations) options.dhcp_reservations.push_back({mac, address});
        py::gil_scoped_release release;
        return vmb::create_network(options);
      },
      py::arg("mode"), py::kw_only(), py::arg("subnet") = py::none(), py::arg("mask") = py::none(),
      py::arg("ipv6_prefix") = py::none(), py::arg("ipv6_prefix_len") = 0, py::arg("mtu") = 0,
      py::arg("external_interface") = py::none(), py::arg("nat44") = true, py::arg("nat66") = true,
      py::arg("dhcp") = true, py::arg("dns_proxy") = true, py::arg("router_advertisement") = true,
      py::arg("port_forwards") = py::list(), py::arg("dhcp_reservations") = py::list(),
      "vmnet_network_configuration_create + setters + vmnet_network_create +\n"
      "vmnet_network_copy_serialization, on one serial dispatch queue (GIL released).\n"
      "``port_forwards``: (\"tcp\"|\"udp\", external_port, internal_address, internal_port);\n"
      "``dhcp_reservations``: (mac, ipv4).  VmnetError naming the failing call;\n"
      "ValueError for an unparsable address, MAC, protocol or number (before any vmnet call).");

  m.def("network_from_serialization", &vmb::network_from_serialization, py::arg("serialization"), nogil(),
        "vmnet_network_create_with_serialization (GIL released); VmnetError on failure.");
}

void bind_client(py::module_& m) {
  py::class_<vmb::XpcClient>(m, "XpcClient",
                             "A connection to a Mach service on its own serial queue, with an event\n"
                             "handler that ignores events, activated.  Connecting is lazy in XPC:\n"
                             "errors show up on the first send.")
      .def(py::init<std::string, bool>(), py::arg("service_name"), py::arg("privileged") = false)
      .def(
          "send",
          [](vmb::XpcClient& c, const py::dict& message, const std::vector<std::string>& opaque) {
            vmb::ValueMap request = message_from_python(message);
            vmb::Value reply;
            {
              py::gil_scoped_release release;  // waits for the service
              reply = c.send(request, opaque);
            }
            return to_python(reply);
          },
          py::arg("message"), py::arg("opaque") = std::vector<std::string>(),
          "xpc_connection_send_message_with_reply_sync (GIL released); the reply as plain\n"
          "values, except that in a dictionary reply the values of the keys in ``opaque``\n"
          "stay XpcObjects (a vmnet serialization is a dictionary to be handed back as is).\n"
          "XpcError for an XPC error reply; ValueError if ``message`` or the reply cannot\n"
          "be converted; OSError after close().")
      .def("close", &vmb::XpcClient::close, nogil(), "Cancel and release the connection; idempotent.");
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() =
      "macOS mechanism for vmnet-broker: the XPC listener and client, and vmnet\n"
      "networks (macOS 26).\n\n"
      "Mechanism only: every name, limit and mode comes from the caller.  XPC\n"
      "messages cross as plain values (None, bool, int, float, str, bytes, list,\n"
      "dict, XpcObject), at most 8 containers deep and 1024 entries each.";
  m.attr("PLATFORM") = "darwin";
  py::register_local_exception_translator(translate);
  bind_errors(m);
  bind_xpc(m);
  bind_listener(m);
  bind_vmnet(m);
  bind_client(m);
}
