/*
 * tvmedge: Serializer<T> for tvm::support::Stream, matching the host TVM's binary layout:
 * numbers as raw little-endian bytes, strings and sequences as a uint64 count followed by
 * the items, maps as a sequence of (key, value) pairs, DLDataType as code/bits/lanes and
 * DLDevice as two int32. Only little-endian devices are supported (riscv64, aarch64).
 */
#ifndef TVMEDGE_SUPPORT_SERIALIZER_H_
#define TVMEDGE_SUPPORT_SERIALIZER_H_

#include <dlpack/dlpack.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/string.h>
#include <tvm/support/io.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace tvm {
namespace support {

template <typename T>
struct Serializer<T, std::enable_if_t<std::is_arithmetic_v<T> || std::is_enum_v<T>>> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const T& v) { s->Write(static_cast<const void*>(&v), sizeof(T)); }
  static bool Read(Stream* s, T* v) { return s->Read(static_cast<void*>(v), sizeof(T)) == sizeof(T); }
};

namespace detail {
inline bool ReadCount(Stream* s, uint64_t* n) { return Serializer<uint64_t>::Read(s, n); }
inline void WriteCount(Stream* s, size_t n) { Serializer<uint64_t>::Write(s, static_cast<uint64_t>(n)); }
inline void WriteBytes(Stream* s, const char* p, size_t n) {
  WriteCount(s, n);
  if (n) s->Write(static_cast<const void*>(p), n);
}
inline bool ReadBytes(Stream* s, std::string* out) {
  uint64_t n;
  if (!ReadCount(s, &n)) return false;
  out->resize(n);
  return n == 0 || s->Read(static_cast<void*>(&(*out)[0]), n) == n;
}
}  // namespace detail

template <>
struct Serializer<std::string> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const std::string& v) { detail::WriteBytes(s, v.data(), v.size()); }
  static bool Read(Stream* s, std::string* v) { return detail::ReadBytes(s, v); }
};

template <>
struct Serializer<ffi::String> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const ffi::String& v) { detail::WriteBytes(s, v.data(), v.size()); }
  static bool Read(Stream* s, ffi::String* v) {
    std::string tmp;
    if (!detail::ReadBytes(s, &tmp)) return false;
    *v = ffi::String(std::move(tmp));
    return true;
  }
};

template <typename T>
struct Serializer<std::vector<T>> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const std::vector<T>& v) {
    detail::WriteCount(s, v.size());
    if constexpr (std::is_arithmetic_v<T>) {
      if (!v.empty()) s->Write(static_cast<const void*>(v.data()), v.size() * sizeof(T));
    } else {
      for (const T& x : v) Serializer<T>::Write(s, x);
    }
  }
  static bool Read(Stream* s, std::vector<T>* v) {
    uint64_t n;
    if (!detail::ReadCount(s, &n)) return false;
    v->resize(n);
    if constexpr (std::is_arithmetic_v<T>) {
      return n == 0 || s->Read(static_cast<void*>(v->data()), n * sizeof(T)) == n * sizeof(T);
    } else {
      for (auto& x : *v) {
        if (!Serializer<T>::Read(s, &x)) return false;
      }
      return true;
    }
  }
};

template <typename A, typename B>
struct Serializer<std::pair<A, B>> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const std::pair<A, B>& v) {
    Serializer<A>::Write(s, v.first);
    Serializer<B>::Write(s, v.second);
  }
  static bool Read(Stream* s, std::pair<A, B>* v) {
    return Serializer<A>::Read(s, &v->first) && Serializer<B>::Read(s, &v->second);
  }
};

template <typename K, typename V>
struct Serializer<std::unordered_map<K, V>> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const std::unordered_map<K, V>& m) {
    detail::WriteCount(s, m.size());
    for (const auto& kv : m) {
      Serializer<K>::Write(s, kv.first);
      Serializer<V>::Write(s, kv.second);
    }
  }
  static bool Read(Stream* s, std::unordered_map<K, V>* m) {
    uint64_t n;
    if (!detail::ReadCount(s, &n)) return false;
    m->clear();
    for (uint64_t i = 0; i < n; ++i) {
      std::pair<K, V> kv;
      if (!Serializer<std::pair<K, V>>::Read(s, &kv)) return false;
      m->emplace(std::move(kv));
    }
    return true;
  }
};

template <typename T>
struct Serializer<ffi::Array<T>> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const ffi::Array<T>& a) {
    detail::WriteCount(s, a.size());
    for (const T& x : a) Serializer<T>::Write(s, x);
  }
  static bool Read(Stream* s, ffi::Array<T>* a) {
    uint64_t n;
    if (!detail::ReadCount(s, &n)) return false;
    ffi::Array<T> out;
    for (uint64_t i = 0; i < n; ++i) {
      T x;
      if (!Serializer<T>::Read(s, &x)) return false;
      out.push_back(std::move(x));
    }
    *a = std::move(out);
    return true;
  }
};

template <typename K, typename V>
struct Serializer<ffi::Map<K, V>> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const ffi::Map<K, V>& m) {
    detail::WriteCount(s, m.size());
    for (const auto& kv : m) {
      Serializer<K>::Write(s, kv.first);
      Serializer<V>::Write(s, kv.second);
    }
  }
  static bool Read(Stream* s, ffi::Map<K, V>* m) {
    uint64_t n;
    if (!detail::ReadCount(s, &n)) return false;
    ffi::Map<K, V> out;
    for (uint64_t i = 0; i < n; ++i) {
      K k;
      V v;
      if (!Serializer<K>::Read(s, &k) || !Serializer<V>::Read(s, &v)) return false;
      out.Set(std::move(k), std::move(v));
    }
    *m = std::move(out);
    return true;
  }
};

template <>
struct Serializer<DLDataType> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const DLDataType& t) {
    Serializer<uint8_t>::Write(s, t.code);
    Serializer<uint8_t>::Write(s, t.bits);
    Serializer<uint16_t>::Write(s, t.lanes);
  }
  static bool Read(Stream* s, DLDataType* t) {
    return Serializer<uint8_t>::Read(s, &t->code) && Serializer<uint8_t>::Read(s, &t->bits) &&
           Serializer<uint16_t>::Read(s, &t->lanes);
  }
};

template <>
struct Serializer<DLDevice> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const DLDevice& d) {
    Serializer<int32_t>::Write(s, static_cast<int32_t>(d.device_type));
    Serializer<int32_t>::Write(s, d.device_id);
  }
  static bool Read(Stream* s, DLDevice* d) {
    int32_t type;
    if (!Serializer<int32_t>::Read(s, &type) || !Serializer<int32_t>::Read(s, &d->device_id)) return false;
    d->device_type = static_cast<DLDeviceType>(type);
    return true;
  }
};

}  // namespace support
}  // namespace tvm

#endif  // TVMEDGE_SUPPORT_SERIALIZER_H_
