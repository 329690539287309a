// The digits data for the fine-tuning demo: loading the gzip'd CSV, a seeded train/test split,
// and the 90-degree rotation that makes the downstream task.
#pragma once

#include <lora/random.hpp>

#include <zlib.h>
#include <Eigen/Core>

#include <algorithm>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace digits {

constexpr int kSide = 8;                  // 8 x 8 images
constexpr int kFeatures = kSide * kSide;  // 64 pixels, row-major in the file
constexpr int kClasses = 10;

/// Images as columns (64 x n, pixel counts scaled from 0..16 to [0, 1]) and their labels.
struct Dataset {
  Eigen::MatrixXf X;
  std::vector<int> y;
  Eigen::Index size() const { return X.cols(); }
};

/// Reads "p0,...,p63,label" lines from a gzip'd CSV. Throws std::runtime_error naming the file and
/// line on anything unexpected.
inline Dataset load_csv_gz(const std::string& path) {
  gzFile f = gzopen(path.c_str(), "rb");
  if (f == nullptr) throw std::runtime_error("digits: cannot open " + path);
  std::vector<float> pixels;
  std::vector<int> labels;
  std::string line;
  char buf[4096];
  int line_no = 0;
  auto fail = [&](const std::string& why) {
    gzclose(f);
    throw std::runtime_error("digits: " + path + ":" + std::to_string(line_no) + ": " + why);
  };
  while (gzgets(f, buf, sizeof buf) != nullptr) {
    line = buf;
    ++line_no;
    while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.pop_back();
    if (line.empty()) continue;
    std::istringstream in(line);
    std::string cell;
    std::vector<int> values;
    while (std::getline(in, cell, ',')) {
      try {
        std::size_t used = 0;
        values.push_back(std::stoi(cell, &used));
        if (used != cell.size()) fail("not an integer: '" + cell + "'");
      } catch (const std::logic_error&) {
        fail("not an integer: '" + cell + "'");
      }
    }
    if (values.size() != kFeatures + 1)
      fail("expected " + std::to_string(kFeatures + 1) + " values, got " +
           std::to_string(values.size()));
    for (int i = 0; i < kFeatures; ++i) {
      if (values[i] < 0 || values[i] > 16) fail("pixel outside 0..16");
      pixels.push_back(static_cast<float>(values[i]) / 16.0f);
    }
    if (values[kFeatures] < 0 || values[kFeatures] >= kClasses) fail("label outside 0..9");
    labels.push_back(values[kFeatures]);
  }
  int err = 0;
  const char* msg = gzerror(f, &err);
  if (err != Z_OK && err != Z_STREAM_END) fail(std::string("gzip error: ") + msg);
  gzclose(f);
  if (labels.empty()) throw std::runtime_error("digits: no samples in " + path);
  Dataset d;
  d.X = Eigen::Map<Eigen::MatrixXf>(pixels.data(), kFeatures, Eigen::Index(labels.size()));
  d.y = std::move(labels);
  return d;
}

/// The columns `idx` of d.
inline Dataset subset(const Dataset& d, const std::vector<int>& idx) {
  Dataset s;
  s.X.resize(d.X.rows(), Eigen::Index(idx.size()));
  s.y.resize(idx.size());
  for (std::size_t j = 0; j < idx.size(); ++j) {
    s.X.col(Eigen::Index(j)) = d.X.col(idx[j]);
    s.y[j] = d.y[idx[j]];
  }
  return s;
}

/// A seeded permutation of 0..n-1 (Fisher-Yates on lora::Rng: the same on every platform).
inline std::vector<int> permutation(int n, lora::Rng& rng) {
  std::vector<int> p(n);
  std::iota(p.begin(), p.end(), 0);
  for (int i = n - 1; i > 0; --i) {
    const int j = static_cast<int>(rng.next() % static_cast<std::uint64_t>(i + 1));
    std::swap(p[i], p[j]);
  }
  return p;
}

/// Splits d into train and test sets, test_fraction of the samples going to test, by a seeded
/// shuffle.
inline std::pair<Dataset, Dataset> split(const Dataset& d, double test_fraction,
                                         std::uint64_t seed) {
  lora::Rng rng(seed);
  const std::vector<int> p = permutation(static_cast<int>(d.size()), rng);
  const auto n_test = static_cast<std::size_t>(test_fraction * double(p.size()) + 0.5);
  const std::vector<int> test(p.begin(), p.begin() + std::ptrdiff_t(n_test));
  const std::vector<int> train(p.begin() + std::ptrdiff_t(n_test), p.end());
  return {subset(d, train), subset(d, test)};
}

/// Every image turned 90 degrees counter-clockwise: out(r, c) = in(c, 7 - r).
inline Dataset rotate90(const Dataset& d) {
  Dataset r = d;
  for (Eigen::Index j = 0; j < d.size(); ++j)
    for (int row = 0; row < kSide; ++row)
      for (int col = 0; col < kSide; ++col)
        r.X(row * kSide + col, j) = d.X(col * kSide + (kSide - 1 - row), j);
  return r;
}

}  // namespace digits
