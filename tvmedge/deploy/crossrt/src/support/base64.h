/* tvmedge: base64 (RFC 4648, '=' padding) encoding/decoding streams over another Stream. */
#ifndef TVMEDGE_SUPPORT_BASE64_H_
#define TVMEDGE_SUPPORT_BASE64_H_

#include <tvm/support/io.h>

#include <cctype>
#include <cstdint>
#include <string>

namespace tvm {
namespace support {

namespace b64 {
inline const char* Alphabet() { return "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"; }
inline int Value(int c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}
}  // namespace b64

class Base64OutStream : public Stream {
 public:
  explicit Base64OutStream(Stream* out) : out_(out) {}
  using Stream::Read;
  using Stream::Write;
  size_t Read(void*, size_t) override { return 0; }
  size_t Write(const void* ptr, size_t size) override {
    const unsigned char* p = static_cast<const unsigned char*>(ptr);
    for (size_t i = 0; i < size; ++i) {
      group_[n_++] = p[i];
      if (n_ == 3) Flush();
    }
    return size;
  }
  /*! \brief encode what is left, with padding */
  void Finish() {
    if (n_ != 0) Flush();
  }

 private:
  void Flush() {
    const char* a = b64::Alphabet();
    uint32_t v = (uint32_t(group_[0]) << 16) | (n_ > 1 ? uint32_t(group_[1]) << 8 : 0) | (n_ > 2 ? group_[2] : 0);
    char enc[4] = {a[(v >> 18) & 63], a[(v >> 12) & 63], n_ > 1 ? a[(v >> 6) & 63] : '=', n_ > 2 ? a[v & 63] : '='};
    out_->Write(static_cast<const void*>(enc), 4);
    n_ = 0;
  }
  Stream* out_;
  unsigned char group_[3] = {0, 0, 0};
  int n_ = 0;
};

class Base64InStream : public Stream {
 public:
  explicit Base64InStream(Stream* in) : in_(in) {}
  using Stream::Read;
  using Stream::Write;
  /*! \brief skip leading white space */
  void InitPosition() {
    char c;
    while (in_->Read(static_cast<void*>(&c), 1) == 1) {
      if (!std::isspace(static_cast<unsigned char>(c))) {
        pending_ = c;
        has_pending_ = true;
        return;
      }
    }
  }
  size_t Read(void* ptr, size_t size) override {
    unsigned char* out = static_cast<unsigned char*>(ptr);
    size_t done = 0;
    while (done < size) {
      if (avail_ == 0 && !Decode()) break;
      out[done++] = bytes_[3 - avail_--];
      // bytes_ holds 3 decoded bytes; avail_ counts down those not yet handed out
    }
    return done;
  }
  size_t Write(const void*, size_t) override { return 0; }

 private:
  bool NextChar(char* c) {
    if (has_pending_) {
      *c = pending_;
      has_pending_ = false;
      return true;
    }
    return in_->Read(static_cast<void*>(c), 1) == 1;
  }
  bool Decode() {
    int vals[4];
    int got = 0;
    char c;
    while (got < 4 && NextChar(&c)) {
      if (c == '=') {
        vals[got++] = -2;
      } else if (b64::Value(c) >= 0) {
        vals[got++] = b64::Value(c);
      }
    }
    if (got < 4) return false;
    int valid = vals[2] == -2 ? 1 : (vals[3] == -2 ? 2 : 3);
    uint32_t v = (uint32_t(vals[0]) << 18) | (uint32_t(vals[1]) << 12) | (valid > 1 ? uint32_t(vals[2]) << 6 : 0) |
                 (valid > 2 ? uint32_t(vals[3]) : 0);
    unsigned char dec[3] = {static_cast<unsigned char>(v >> 16), static_cast<unsigned char>(v >> 8),
                            static_cast<unsigned char>(v)};
    // right-align the valid bytes so bytes_[3 - avail_] walks them in order
    for (int i = 0; i < 3; ++i) bytes_[i] = 0;
    for (int i = 0; i < valid; ++i) bytes_[3 - valid + i] = dec[i];
    avail_ = valid;
    return true;
  }
  Stream* in_;
  unsigned char bytes_[3] = {0, 0, 0};
  int avail_ = 0;
  char pending_ = 0;
  bool has_pending_ = false;
};

}  // namespace support
}  // namespace tvm
#endif
