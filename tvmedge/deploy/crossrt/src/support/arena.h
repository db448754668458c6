/* tvmedge: a scratch allocator whose allocations are all released at once (RecycleAll). */
#ifndef TVMEDGE_SUPPORT_ARENA_H_
#define TVMEDGE_SUPPORT_ARENA_H_

#include <cstddef>
#include <cstdlib>
#include <new>
#include <vector>

namespace tvm {
namespace support {

class Arena {
 public:
  Arena() = default;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  ~Arena() { RecycleAll(); }

  template <typename T>
  T* allocate_(int count = 1) {
    size_t bytes = sizeof(T) * static_cast<size_t>(count > 0 ? count : 1);
    void* p = std::aligned_alloc(kAlign, (bytes + kAlign - 1) / kAlign * kAlign);
    if (p == nullptr) throw std::bad_alloc();
    blocks_.push_back(p);
    return static_cast<T*>(p);
  }

  void RecycleAll() {
    for (void* p : blocks_) std::free(p);
    blocks_.clear();
  }

 private:
  static constexpr size_t kAlign = 64;
  std::vector<void*> blocks_;
};

}  // namespace support
}  // namespace tvm
#endif
