/*
 * tvmedge: the byte queue TVM's RPC endpoint buffers a channel with. A contiguous buffer
 * with a read offset; consumed space is reclaimed by moving the unread bytes to the front.
 */
#ifndef TVMEDGE_SUPPORT_RING_BUFFER_H_
#define TVMEDGE_SUPPORT_RING_BUFFER_H_

#include <algorithm>
#include <cstring>
#include <vector>

namespace tvm {
namespace support {

class RingBuffer {
 public:
  size_t bytes_available() const { return end_ - begin_; }

  /*! \brief make room for at least n unread bytes */
  void Reserve(size_t n) { Room(n > bytes_available() ? n - bytes_available() : 0); }

  void Read(void* data, size_t size) {
    std::memcpy(data, buf_.data() + begin_, size);
    begin_ += size;
  }

  void Write(const void* data, size_t size) {
    Room(size);
    std::memcpy(buf_.data() + end_, data, size);
    end_ += size;
  }

  /*! \brief hand up to max_nbytes unread bytes to frecv(data, size), which returns how many it took */
  template <typename F>
  size_t ReadWithCallback(F frecv, size_t max_nbytes) {
    size_t n = std::min(max_nbytes, bytes_available());
    if (n == 0) return 0;
    size_t took = frecv(static_cast<const void*>(buf_.data() + begin_), n);
    begin_ += took;
    return took;
  }

  /*! \brief let fsend(data, size) fill up to max_nbytes; it returns how many it wrote */
  template <typename F>
  size_t WriteWithCallback(F fsend, size_t max_nbytes) {
    Room(max_nbytes);
    size_t got = fsend(static_cast<void*>(buf_.data() + end_), max_nbytes);
    end_ += got;
    return got;
  }

 private:
  void Room(size_t extra) {
    if (begin_ == end_) begin_ = end_ = 0;
    if (end_ + extra <= buf_.size()) return;
    if (begin_ > 0) {
      std::memmove(buf_.data(), buf_.data() + begin_, end_ - begin_);
      end_ -= begin_;
      begin_ = 0;
    }
    if (end_ + extra > buf_.size()) buf_.resize(std::max(buf_.size() * 2, end_ + extra));
  }
  std::vector<char> buf_;
  size_t begin_ = 0, end_ = 0;
};

}  // namespace support
}  // namespace tvm
#endif
