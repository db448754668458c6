/*
 * tvmedge: IEEE-754 binary conversions between float/double and narrower formats given as
 * raw bits (the templates TVM's runtime sources call for float16), round to nearest even.
 * Written for tvmedge's cross-build; the wheel does not ship compiler-rt.
 */
#ifndef TVMEDGE_BUILTIN_FP16_H_
#define TVMEDGE_BUILTIN_FP16_H_

#include <cmath>
#include <cstdint>

/*! \brief a (float or double) -> the bits of a narrower IEEE type with DstSigBits mantissa bits */
template <typename SrcT, typename SrcRepT, int SrcSigBits, typename DstT, typename DstRepT, int DstSigBits>
static inline DstT __truncXfYf2__(SrcT a) {
  constexpr int kBits = static_cast<int>(sizeof(DstRepT) * 8);
  constexpr int kExpBits = kBits - DstSigBits - 1;
  constexpr int kBias = (1 << (kExpBits - 1)) - 1;
  constexpr uint64_t kExpMask = ((uint64_t(1) << kExpBits) - 1) << DstSigBits;
  double x = static_cast<double>(a);
  uint64_t sign = std::signbit(x) ? (uint64_t(1) << (kBits - 1)) : 0;
  x = std::fabs(x);
  if (std::isnan(x)) return static_cast<DstT>(sign | kExpMask | (uint64_t(1) << (DstSigBits - 1)));
  if (std::isinf(x)) return static_cast<DstT>(sign | kExpMask);
  if (x == 0) return static_cast<DstT>(sign);
  int e;
  double m = std::frexp(x, &e);  // x = m * 2^e, m in [0.5, 1)
  int exponent = e - 1;
  if (exponent < 1 - kBias) {  // subnormal (rounding up may give the smallest normal: same bits)
    double r = std::nearbyint(std::ldexp(x, DstSigBits - (1 - kBias)));
    return static_cast<DstT>(sign | static_cast<uint64_t>(r));
  }
  uint64_t mant = static_cast<uint64_t>(std::nearbyint(std::ldexp(m, DstSigBits + 1)));
  int biased = exponent + kBias;
  if (mant == (uint64_t(1) << (DstSigBits + 1))) {
    mant >>= 1;
    biased += 1;
  }
  if (biased >= (1 << kExpBits) - 1) return static_cast<DstT>(sign | kExpMask);  // overflow: infinity
  return static_cast<DstT>(sign | (uint64_t(biased) << DstSigBits) | (mant & ((uint64_t(1) << DstSigBits) - 1)));
}

/*! \brief the bits of a narrower IEEE type (SrcSigBits mantissa bits) -> DstT (float or double) */
template <typename SrcT, typename SrcRepT, int SrcSigBits, typename DstT, typename DstRepT, int DstSigBits>
static inline DstT __extendXfYf2__(SrcT a) {
  constexpr int kBits = static_cast<int>(sizeof(SrcRepT) * 8);
  constexpr int kExpBits = kBits - SrcSigBits - 1;
  constexpr int kBias = (1 << (kExpBits - 1)) - 1;
  uint64_t bits = static_cast<uint64_t>(static_cast<SrcRepT>(a));
  bool negative = (bits >> (kBits - 1)) & 1;
  int biased = static_cast<int>((bits >> SrcSigBits) & ((uint64_t(1) << kExpBits) - 1));
  uint64_t mant = bits & ((uint64_t(1) << SrcSigBits) - 1);
  double v;
  if (biased == (1 << kExpBits) - 1) {
    v = mant ? std::nan("") : INFINITY;
  } else if (biased == 0) {
    v = std::ldexp(static_cast<double>(mant), 1 - kBias - SrcSigBits);
  } else {
    v = std::ldexp(static_cast<double>(mant | (uint64_t(1) << SrcSigBits)), biased - kBias - SrcSigBits);
  }
  return static_cast<DstT>(negative ? -v : v);
}

#endif
