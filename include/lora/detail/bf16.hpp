// bfloat16 storage helpers for the bf16 frozen base: a bf16 matrix type and bulk conversions.
// Rounding is to nearest, ties to even (as lora::io::float_to_bf16, element for element), written
// as plain loops over integers that compilers vectorise.
#pragma once

#include <Eigen/Core>

#include <cstdint>
#include <cstring>

namespace lora::detail {

/// A bfloat16 number as its bit pattern: the upper 16 bits of an IEEE binary32.
using bf16 = std::uint16_t;
/// A column-major matrix of bf16 bit patterns (Eigen stores it; nothing computes in it directly).
using Bf16Matrix = Eigen::Matrix<bf16, Eigen::Dynamic, Eigen::Dynamic>;

/// float -> bf16, round to nearest even; NaN stays NaN (quieted), infinities stay infinite.
inline bf16 round_to_bf16(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  const std::uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  return static_cast<bf16>(nan ? ((u >> 16) | 0x0040u) : (rounded >> 16));
}

/// bf16 -> float: exact.
inline float widen_bf16(bf16 h) {
  const std::uint32_t u = std::uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

/// dst[i] = round_to_bf16(src[i]) for i < count.
inline void to_bf16(const float* src, bf16* dst, Eigen::Index count) {
  for (Eigen::Index i = 0; i < count; ++i) dst[i] = round_to_bf16(src[i]);
}

/// dst[i] = widen_bf16(src[i]) for i < count.
inline void from_bf16(const bf16* src, float* dst, Eigen::Index count) {
  for (Eigen::Index i = 0; i < count; ++i) dst[i] = widen_bf16(src[i]);
}

/// dst[i] = widen_bf16(round_to_bf16(src[i])): x as the bf16 product will see it, kept in fp32.
inline void round_through_bf16(const float* src, float* dst, Eigen::Index count) {
  for (Eigen::Index i = 0; i < count; ++i) dst[i] = widen_bf16(round_to_bf16(src[i]));
}

/// Converts a (possibly strided) float matrix to a packed bf16 one, column by column.
inline void to_bf16(const Eigen::Ref<const Eigen::MatrixXf>& src, Bf16Matrix& dst) {
  dst.resize(src.rows(), src.cols());
  for (Eigen::Index j = 0; j < src.cols(); ++j)
    to_bf16(src.data() + j * src.outerStride(), dst.col(j).data(), src.rows());
}

}  // namespace lora::detail
