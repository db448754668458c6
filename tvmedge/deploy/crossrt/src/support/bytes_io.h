/* tvmedge: tvm::support::Stream over an in-memory byte string (reads) or a std::string (writes). */
#ifndef TVMEDGE_SUPPORT_BYTES_IO_H_
#define TVMEDGE_SUPPORT_BYTES_IO_H_

#include <tvm/support/io.h>

#include <algorithm>
#include <cstring>
#include <string>

namespace tvm {
namespace support {

/*! \brief Reads from a buffer the caller keeps alive while the stream is used. */
class BytesInStream : public Stream {
 public:
  BytesInStream(const char* data, size_t size) : data_(data), size_(size) {}
  template <typename Buffer>  // std::string, ffi::Bytes, ffi::String: anything with data()/size()
  explicit BytesInStream(const Buffer& buf) : data_(buf.data()), size_(buf.size()) {}
  using Stream::Read;
  using Stream::Write;
  size_t Read(void* ptr, size_t size) override {
    size_t n = std::min(size, size_ - pos_);
    if (n) std::memcpy(ptr, data_ + pos_, n);
    pos_ += n;
    return n;
  }
  size_t Write(const void*, size_t) override { return 0; }

 private:
  const char* data_;
  size_t size_;
  size_t pos_ = 0;
};

/*! \brief Appends to a std::string. */
class BytesOutStream : public Stream {
 public:
  explicit BytesOutStream(std::string* out) : out_(out) {}
  using Stream::Read;
  using Stream::Write;
  size_t Read(void*, size_t) override { return 0; }
  size_t Write(const void* ptr, size_t size) override {
    out_->append(static_cast<const char*>(ptr), size);
    return size;
  }

 private:
  std::string* out_;
};

}  // namespace support
}  // namespace tvm
#endif
