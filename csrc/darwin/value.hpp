// Plain data crossing the XPC boundary, and its conversion to and from XPC
// objects.  No Python here: module_darwin.cpp maps Value to Python objects,
// so the XPC event handlers can convert requests without the GIL.
#pragma once

#include <xpc/xpc.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <variant>
#include <vector>

#include "darwin/xpc_object.hpp"

namespace vmb {

// Limits on what is converted, both ways.  A peer can send any XPC content;
// these bound the work and memory one request costs before policy sees it.
// Depth counts containers: the message dictionary itself is depth 1.
constexpr int kMaxDepth = 8;
constexpr std::size_t kMaxEntries = 1024;  // per array or dictionary

struct Value;
using Bytes = std::vector<std::uint8_t>;
using ValueList = std::vector<Value>;
using ValueMap = std::map<std::string, Value>;

// XPC null, bool, int64, double, string, data, array, dictionary; anything
// else (and a uint64 above INT64_MAX) stays an opaque XpcObject.  Strings
// hold XPC's bytes as they came: a peer may send invalid UTF-8, and the
// bindings decode with replacement.
struct Value {
  std::variant<std::monostate, bool, std::int64_t, double, std::string, Bytes, ValueList, ValueMap, XpcObject> data;
};

// Throws InvalidValue if a container at `depth` with `count` entries is
// beyond the limits.  Shared with the bindings, which walk Python objects
// (possibly self-referencing) before anything reaches to_xpc.
void check_container(int depth, std::size_t count, const char* kind);

// Builds the XPC object for `value`; the message dictionary is depth 1.
// InvalidValue for a string or key with NUL, an empty XpcObject, or content
// beyond the limits.
XpcObject to_xpc(const Value& value);

// Converts a borrowed XPC object.  InvalidValue beyond the limits.
Value from_xpc(xpc_object_t object);

// As from_xpc, except that in a dictionary the values of `opaque_keys` stay
// XpcObjects: a vmnet serialization is itself a dictionary, and a client
// must hand it back to vmnet as it came, not as plain values.
Value from_xpc(xpc_object_t object, const std::vector<std::string>& opaque_keys);

// xpc_type_get_name of the object's type ("dictionary", "data", ...).
std::string xpc_type_name(xpc_object_t object);
// xpc_copy_description, for logs.
std::string xpc_description(xpc_object_t object);
// XPC_ERROR_KEY_DESCRIPTION of an error object.
std::string xpc_error_description(xpc_object_t error);

}  // namespace vmb
