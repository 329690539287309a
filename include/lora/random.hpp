// A small, portable random source. The standard <random> distributions are
// implementation-defined (libstdc++ and libc++ give different normals for the same seed), so the
// library draws from xoshiro256** (seeded through SplitMix64) and makes its own uniforms and
// normals: the same seed gives the same adapter with every compiler and standard library.
#pragma once

#include <Eigen/Core>

#include <cmath>
#include <cstdint>

namespace lora {

/// xoshiro256** 1.0 (Blackman & Vigna), seeded by SplitMix64 as its authors recommend.
class Rng {
 public:
  /// A generator whose sequence depends only on `seed`.
  explicit Rng(std::uint64_t seed = 0) {
    std::uint64_t x = seed;
    for (auto& word : state_) word = splitmix64(x);
  }

  /// The next 64 random bits.
  std::uint64_t next() {
    const std::uint64_t result = rotl(state_[1] * 5, 7) * 9;
    const std::uint64_t t = state_[1] << 17;
    state_[2] ^= state_[0];
    state_[3] ^= state_[1];
    state_[1] ^= state_[2];
    state_[0] ^= state_[3];
    state_[2] ^= t;
    state_[3] = rotl(state_[3], 45);
    return result;
  }

  /// Uniform on [0, 1), with 53 random bits.
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

  /// Uniform on [lo, hi).
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }

  /// Standard normal by the Box-Muller transform; each call uses two uniforms and returns one
  /// value (the sine branch is discarded), so a draw never depends on an earlier odd/even call.
  double normal() {
    const double u1 = 1.0 - uniform();  // (0, 1]: log(u1) is finite
    const double u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }

  /// Bernoulli(p): true with probability p.
  bool bernoulli(double p) { return uniform() < p; }

 private:
  static std::uint64_t rotl(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  static std::uint64_t splitmix64(std::uint64_t& x) {
    std::uint64_t z = (x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  std::uint64_t state_[4];
};

/// Fills m with N(mean, stddev^2) draws in column-major order.
template <typename Derived>
void fill_normal(Eigen::MatrixBase<Derived>& m, Rng& rng, double mean, double stddev) {
  using Scalar = typename Derived::Scalar;
  for (Eigen::Index j = 0; j < m.cols(); ++j)
    for (Eigen::Index i = 0; i < m.rows(); ++i)
      m(i, j) = static_cast<Scalar>(mean + stddev * rng.normal());
}

/// Fills m with U(lo, hi) draws in column-major order.
template <typename Derived>
void fill_uniform(Eigen::MatrixBase<Derived>& m, Rng& rng, double lo, double hi) {
  using Scalar = typename Derived::Scalar;
  for (Eigen::Index j = 0; j < m.cols(); ++j)
    for (Eigen::Index i = 0; i < m.rows(); ++i) m(i, j) = static_cast<Scalar>(rng.uniform(lo, hi));
}

}  // namespace lora
