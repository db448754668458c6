/*
 * tvmedge: the byte stream interface TVM's runtime sources use (tvm::support::Stream).
 * Not shipped in the apache-tvm wheel; written for tvmedge's cross-build of the runtime.
 * Typed reads/writes go through Serializer<T> (tvm/support/serializer.h), whose binary
 * format is the one the host's TVM writes (little endian, uint64 lengths).
 */
#ifndef TVMEDGE_SUPPORT_IO_H_
#define TVMEDGE_SUPPORT_IO_H_

#include <cstddef>
#include <cstdint>

namespace tvm {
namespace support {

template <typename T, typename Enable = void>
struct Serializer;

class Stream {
 public:
  virtual ~Stream() = default;
  /*! \brief read up to size bytes; returns the number read */
  virtual size_t Read(void* ptr, size_t size) = 0;
  /*! \brief write size bytes; returns the number written */
  virtual size_t Write(const void* ptr, size_t size) = 0;

  template <typename T>
  void Write(const T& value) {
    Serializer<T>::Write(this, value);
  }
  template <typename T>
  bool Read(T* out) {
    return Serializer<T>::Read(this, out);
  }
  template <typename T>
  void WriteArray(const T* values, size_t n) {
    for (size_t i = 0; i < n; ++i) Serializer<T>::Write(this, values[i]);
  }
  template <typename T>
  bool ReadArray(T* values, size_t n) {
    for (size_t i = 0; i < n; ++i) {
      if (!Serializer<T>::Read(this, values + i)) return false;
    }
    return true;
  }
};

}  // namespace support
}  // namespace tvm

#include <tvm/support/serializer.h>

#endif  // TVMEDGE_SUPPORT_IO_H_
