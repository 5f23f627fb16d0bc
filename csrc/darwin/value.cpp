#include "darwin/value.hpp"

#include <algorithm>

#include <cstdlib>
#include <limits>
#include <memory>
#include <utility>

#include "darwin/error.hpp"

namespace vmb {

namespace {

XpcObject to_xpc(const Value& value, int depth);

// XPC strings are C strings: a NUL would silently cut the text.
const char* c_string(const std::string& text, const char* what) {
  if (text.find('\0') != std::string::npos) throw InvalidValue(std::string(what) + " contains NUL");
  return text.c_str();
}

XpcObject to_xpc_array(const ValueList& list, int depth) {
  check_container(depth, list.size(), "array");
  XpcObject array = XpcObject::adopt(xpc_array_create_empty());
  for (const Value& item : list) {
    XpcObject child = to_xpc(item, depth + 1);
    xpc_array_append_value(array.get(), child.get());  // retains child
  }
  return array;
}

XpcObject to_xpc_dictionary(const ValueMap& map, int depth) {
  check_container(depth, map.size(), "dictionary");
  XpcObject dict = XpcObject::adopt(xpc_dictionary_create_empty());
  for (const auto& [key, item] : map) {
    const char* name = c_string(key, "dictionary key");
    XpcObject child = to_xpc(item, depth + 1);
    xpc_dictionary_set_value(dict.get(), name, child.get());  // retains child
  }
  return dict;
}

XpcObject to_xpc(const Value& value, int depth) {
  const auto& v = value.data;
  if (std::holds_alternative<std::monostate>(v)) return XpcObject::adopt(xpc_null_create());
  if (auto* b = std::get_if<bool>(&v)) return XpcObject::adopt(xpc_bool_create(*b));
  if (auto* i = std::get_if<std::int64_t>(&v)) return XpcObject::adopt(xpc_int64_create(*i));
  if (auto* d = std::get_if<double>(&v)) return XpcObject::adopt(xpc_double_create(*d));
  if (auto* s = std::get_if<std::string>(&v)) return XpcObject::adopt(xpc_string_create(c_string(*s, "string")));
  if (auto* bytes = std::get_if<Bytes>(&v)) return XpcObject::adopt(xpc_data_create(bytes->data(), bytes->size()));
  if (auto* list = std::get_if<ValueList>(&v)) return to_xpc_array(*list, depth);
  if (auto* map = std::get_if<ValueMap>(&v)) return to_xpc_dictionary(*map, depth);
  const XpcObject& object = std::get<XpcObject>(v);
  if (!object) throw InvalidValue("empty XpcObject");
  return object;  // one more reference, owned by the container it goes into
}

Value from_xpc(xpc_object_t object, int depth);

Value from_xpc_array(xpc_object_t array, int depth) {
  std::size_t count = xpc_array_get_count(array);
  check_container(depth, count, "array");
  ValueList list;
  list.reserve(count);
  for (std::size_t i = 0; i < count; ++i) list.push_back(from_xpc(xpc_array_get_value(array, i), depth + 1));
  return Value{std::move(list)};
}

Value from_xpc_dictionary(xpc_object_t dict, int depth, const std::vector<std::string>* opaque_keys = nullptr) {
  std::size_t count = xpc_dictionary_get_count(dict);
  check_container(depth, count, "dictionary");
  // Only collect inside the block: with room reserved, nothing there can
  // throw, and no exception may unwind through xpc_dictionary_apply.  Keys
  // and values are borrowed from `dict`, which outlives this function.
  std::vector<std::pair<const char*, xpc_object_t>> entries;
  entries.reserve(count);
  auto* out = &entries;
  xpc_dictionary_apply(dict, ^bool(const char* key, xpc_object_t item) {
    if (out->size() == out->capacity()) return false;  // grew since the count: ignore the rest
    out->emplace_back(key, item);
    return true;
  });
  ValueMap map;
  for (const auto& [key, item] : entries) {
    bool opaque = opaque_keys != nullptr &&
                  std::find(opaque_keys->begin(), opaque_keys->end(), key) != opaque_keys->end();
    map.emplace(key, opaque ? Value{XpcObject::retain(item)} : from_xpc(item, depth + 1));
  }
  return Value{std::move(map)};
}

Value from_xpc(xpc_object_t object, int depth) {
  xpc_type_t type = xpc_get_type(object);
  if (type == XPC_TYPE_NULL) return Value{};
  if (type == XPC_TYPE_BOOL) return Value{xpc_bool_get_value(object)};
  if (type == XPC_TYPE_INT64) return Value{static_cast<std::int64_t>(xpc_int64_get_value(object))};
  if (type == XPC_TYPE_UINT64) {
    // Value has no unsigned integer: one that does not fit int64 stays an
    // XpcObject, so it is neither lost nor a reason to reject a request,
    // and goes back to XPC unchanged.
    std::uint64_t n = xpc_uint64_get_value(object);
    if (n <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
      return Value{static_cast<std::int64_t>(n)};
    return Value{XpcObject::retain(object)};
  }
  if (type == XPC_TYPE_DOUBLE) return Value{xpc_double_get_value(object)};
  if (type == XPC_TYPE_STRING) {
    const char* text = xpc_string_get_string_ptr(object);
    return Value{text != nullptr ? std::string(text, xpc_string_get_length(object)) : std::string()};
  }
  if (type == XPC_TYPE_DATA) {
    auto* bytes = static_cast<const std::uint8_t*>(xpc_data_get_bytes_ptr(object));
    std::size_t size = bytes != nullptr ? xpc_data_get_length(object) : 0;
    return Value{Bytes(bytes, bytes + size)};
  }
  if (type == XPC_TYPE_ARRAY) return from_xpc_array(object, depth);
  if (type == XPC_TYPE_DICTIONARY) return from_xpc_dictionary(object, depth);
  return Value{XpcObject::retain(object)};
}

}  // namespace

void check_container(int depth, std::size_t count, const char* kind) {
  if (depth > kMaxDepth)
    throw InvalidValue(std::string(kind) + " nested deeper than " + std::to_string(kMaxDepth) + " levels");
  if (count > kMaxEntries)
    throw InvalidValue(std::string(kind) + " of " + std::to_string(count) + " entries (at most " +
                       std::to_string(kMaxEntries) + ")");
}

XpcObject to_xpc(const Value& value) { return to_xpc(value, 1); }

Value from_xpc(xpc_object_t object) { return from_xpc(object, 1); }

Value from_xpc(xpc_object_t object, const std::vector<std::string>& opaque_keys) {
  if (xpc_get_type(object) != XPC_TYPE_DICTIONARY) return from_xpc(object, 1);
  return from_xpc_dictionary(object, 1, &opaque_keys);
}

std::string xpc_type_name(xpc_object_t object) {
  const char* name = xpc_type_get_name(xpc_get_type(object));
  return name != nullptr ? name : "unknown";
}

std::string xpc_description(xpc_object_t object) {
  std::unique_ptr<char, decltype(&std::free)> text(xpc_copy_description(object), &std::free);
  return text ? text.get() : "";
}

std::string xpc_error_description(xpc_object_t error) {
  const char* text = xpc_dictionary_get_string(error, XPC_ERROR_KEY_DESCRIPTION);
  return text != nullptr ? text : "XPC error without a description";
}

}  // namespace vmb
