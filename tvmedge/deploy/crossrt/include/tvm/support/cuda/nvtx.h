/* tvmedge: NVTX profiling ranges are a no-op on a CPU-only device runtime. */
#ifndef TVMEDGE_SUPPORT_CUDA_NVTX_H_
#define TVMEDGE_SUPPORT_CUDA_NVTX_H_
#include <string>
namespace tvm {
namespace support {
class NVTXScopedRange {
 public:
  explicit NVTXScopedRange(const char*) {}
  explicit NVTXScopedRange(const std::string&) {}
};
}  // namespace support
}  // namespace tvm
#endif
