/* tvmedge: the small string helpers TVM's runtime sources use. */
#ifndef TVMEDGE_SUPPORT_UTILS_H_
#define TVMEDGE_SUPPORT_UTILS_H_

#include <cctype>
#include <string>

namespace tvm {
namespace support {

inline bool StartsWith(const std::string& s, const std::string& prefix) {
  return s.size() >= prefix.size() && s.compare(0, prefix.size(), prefix) == 0;
}

inline bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

/*! \brief a non-empty string of decimal digits */
inline bool IsNumber(const std::string& s) {
  if (s.empty()) return false;
  for (char c : s) {
    if (!std::isdigit(static_cast<unsigned char>(c))) return false;
  }
  return true;
}

}  // namespace support
}  // namespace tvm
#endif
