// GgmlFrozenWeight: llama.cpp's block formats as a frozen base. The blocks' values are ggml's (bit
// for bit: test_llama_cpp_reference); here the products (fused decoding kernel and panels, both
// orientations) against a plain product in double on the dequantized weight, the storage's layout
// against the row-by-row dequantizer, and every refusal of a malformed tensor. The layer-level
// contract is the conformance battery's (test_conformance, configuration Ggml).
#include "test_helpers.hpp"

#include <lora/ggml_frozen_weight.hpp>
#include <lora/lora.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace test_ggml_frozen_weight {
namespace {

using Eigen::MatrixXd;
using Eigen::MatrixXf;
using lora::GgmlFrozenWeight;
using lora::io::GgmlType;

MatrixXf random_matrix(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed) {
  lora::Rng rng(seed);
  MatrixXf m(rows, cols);
  lora::fill_normal(m, rng, 0.0f, 1.0f);
  return m;
}

/// Random block bytes of `type` whose fp16 scales are finite (d and dmin of a few units).
std::vector<std::uint8_t> random_blocks(GgmlType type, std::int64_t ne0, std::int64_t ne1,
                                        std::uint32_t seed) {
  const auto& t = lora::io::ggml_type_traits(type);
  std::vector<std::uint8_t> bytes(*lora::io::ggml_row_bytes(type, ne0) * std::size_t(ne1));
  for (auto& b : bytes) {
    seed = seed * 1664525u + 1013904223u;
    b = static_cast<std::uint8_t>(seed >> 24);
  }
  for (std::size_t at = 0; at < bytes.size(); at += t.type_size) {
    auto put = [&](std::size_t off, float v) {
      const std::uint16_t h = lora::io::float_to_f16(v);
      std::memcpy(&bytes[at + off], &h, 2);
    };
    const float d = 0.01f * static_cast<float>(bytes[at + 1] % 16 + 1);
    if (type == GgmlType::Q6_K) {
      put(208, d);
    } else {
      put(0, d);
      if (type == GgmlType::Q4_K || type == GgmlType::Q5_K) put(2, 0.5f * d);
    }
  }
  return bytes;
}

/// max |ours - ref| <= tol * (|W| |X|) element by element: fp32 summation's bound.
void expect_product_near(const MatrixXf& ours, const MatrixXd& ref, const MatrixXd& bound,
                         const std::string& what) {
  ASSERT_EQ(ours.rows(), ref.rows());
  ASSERT_EQ(ours.cols(), ref.cols());
  for (Eigen::Index j = 0; j < ref.cols(); ++j)
    for (Eigen::Index i = 0; i < ref.rows(); ++i)
      ASSERT_LE(std::abs(double(ours(i, j)) - ref(i, j)), 1e-5 * bound(i, j) + 1e-30)
          << what << " at (" << i << ", " << j << ")";
}

void check_products(const GgmlFrozenWeight& w, const std::string& what) {
  const MatrixXd W = w.dequantized().cast<double>();
  for (Eigen::Index n : {1, 3, 8, 9, 40}) {
    SCOPED_TRACE(what + ", n = " + std::to_string(n));
    const MatrixXf X = random_matrix(w.in_features(), n, 7 + n);
    const MatrixXf G = random_matrix(w.out_features(), n, 8 + n);
    MatrixXf H(w.out_features(), n);
    w.multiply(X, H);
    expect_product_near(H, W * X.cast<double>(), W.cwiseAbs() * X.cast<double>().cwiseAbs(), "W X");
    MatrixXf H2 = MatrixXf::Constant(w.out_features(), n, 1.5f);
    w.multiply_add(X, H2);
    expect_product_near(H2, (W * X.cast<double>()).array() + 1.5,
                        (W.cwiseAbs() * X.cast<double>().cwiseAbs()).array() + 1.5, "W X + H");
    MatrixXf dX = MatrixXf::Constant(w.in_features(), n, -0.5f);
    w.multiply_transposed_add(G, dX);
    expect_product_near(dX, (W.transpose() * G.cast<double>()).array() - 0.5,
                        (W.cwiseAbs().transpose() * G.cast<double>().cwiseAbs()).array() + 0.5,
                        "W^T G + dX");
  }
}

TEST(GgmlFrozenWeight, ProductsMatchADoubleProductOnTheDequantizedWeight) {
  // Tensors as a file holds them (random block bytes), every supported block type; wide enough
  // for several panels (k = 512, d = 300: panels of 256 rows, and a last partial one).
  for (GgmlType type : {GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q5_0, GgmlType::Q4_K,
                        GgmlType::Q5_K, GgmlType::Q6_K, GgmlType::F16}) {
    const std::string name = lora::io::ggml_type_traits(type).name;
    std::vector<std::uint8_t> bytes =
        type == GgmlType::F16 ? GgmlFrozenWeight::ggml_encode(random_matrix(300, 512, 3), type)
                              : random_blocks(type, 512, 300, 11);
    GgmlFrozenWeight w(bytes, type, 512, 300, "blk.0.ffn_up.weight", lora::MergeMode::ExactRestore,
                       lora::GgmlBackend::Portable);
    EXPECT_EQ(w.in_features(), 512);
    EXPECT_EQ(w.out_features(), 300);
    EXPECT_EQ(w.packed_bytes(), bytes.size());
    // The layout: row i of W0 is the i-th run of ne0 values of ggml's dequantizer.
    std::vector<float> all(512 * 300);
    lora::io::ggml::dequantize(type, bytes.data(), all.data(), all.size());
    const MatrixXf W = w.dequantized();
    for (Eigen::Index i = 0; i < 300; ++i)
      for (Eigen::Index j = 0; j < 512; ++j)
        ASSERT_EQ(W(i, j), all[std::size_t(i * 512 + j)]) << name << " (" << i << ", " << j << ")";
    check_products(w, name);
  }
}

TEST(GgmlFrozenWeight, QuantizePadsRowsToWholeBlocksAndKeepsTheWidth) {
  // 64 input features in Q4_K (super-blocks of 256): rows padded with zeros, products on the 64.
  const MatrixXf W0 = random_matrix(40, 64, 5);
  const GgmlFrozenWeight w = GgmlFrozenWeight::quantize(W0, GgmlType::Q4_K);
  EXPECT_EQ(w.in_features(), 64);
  EXPECT_EQ(w.row_values(), 256);
  EXPECT_EQ(w.packed_bytes(), 40u * 144u);
  // The same blocks as ggml's quantizer gives the zero-padded rows (lora's quantizer is ggml's
  // bit for bit: test_llama_cpp_reference), and the values of the first 64 columns.
  MatrixXf padded = MatrixXf::Zero(40, 256);
  padded.leftCols(64) = W0;
  EXPECT_EQ(w.blocks(), GgmlFrozenWeight::ggml_encode(padded, GgmlType::Q4_K));
  const MatrixXf W = w.dequantized();
  EXPECT_EQ(W.cols(), 64);
  // 4-bit: within a few per cent of the weights' scale.
  EXPECT_LT((W - W0).norm() / W0.norm(), 0.15);
  check_products(w, "q4_K padded");
}

TEST(GgmlFrozenWeight, BitsPerWeightAreTheBlocksAsStored) {
  const MatrixXf W0 = random_matrix(8, 512, 6);
  const struct {
    GgmlType type;
    double bits, max_rel_error;
  } cases[] = {{GgmlType::Q8_0, 8.5, 0.01},
               {GgmlType::Q4_0, 4.5, 0.15},
               {GgmlType::Q4_K, 4.5, 0.12},
               {GgmlType::Q6_K, 6.5625, 0.04}};
  for (const auto& c : cases) {
    const GgmlFrozenWeight w = GgmlFrozenWeight::quantize(W0, c.type);
    EXPECT_DOUBLE_EQ(w.bits_per_parameter(), c.bits) << int(c.type);
    EXPECT_EQ(w.stored_bytes(), w.packed_bytes());
    EXPECT_LT((w.dequantized() - W0).norm() / W0.norm(), c.max_rel_error) << int(c.type);
  }
}

TEST(GgmlFrozenWeight, MergeBuildsTheFp32WeightBesideTheBlocksAndStatesItsBytes) {
  const MatrixXf W0 = random_matrix(16, 256, 9);
  GgmlFrozenWeight w = GgmlFrozenWeight::quantize(W0, GgmlType::Q4_K);
  const std::vector<std::uint8_t> blocks = w.blocks();
  const MatrixXf before = w.dequantized();
  const MatrixXf B = random_matrix(16, 2, 10), A = random_matrix(2, 256, 11);
  w.merge(0.5f, B, A);
  EXPECT_EQ(w.stored_bytes(), w.packed_bytes() + 16u * 256u * 4u);
  EXPECT_LT((w.weight().cast<double>() - (before.cast<double>() + 0.5 * (B * A).cast<double>()))
                .cwiseAbs()
                .maxCoeff(),
            1e-5);
  w.unmerge(0.5f, B, A);
  EXPECT_EQ(w.blocks(), blocks);
  EXPECT_TRUE(w.weight() == before);
  EXPECT_THROW(GgmlFrozenWeight::quantize(W0, GgmlType::Q4_K, lora::MergeMode::InPlace),
               std::invalid_argument);
}

/// The message of the io::FormatError that constructing from `bytes` throws ("" if none).
std::string refusal(std::vector<std::uint8_t> bytes, GgmlType type, std::int64_t ne0,
                    std::int64_t ne1) {
  try {
    GgmlFrozenWeight w(std::move(bytes), type, ne0, ne1, "blk.3.attn_k.weight");
  } catch (const lora::io::FormatError& e) {
    return e.what();
  }
  return "";
}

TEST(GgmlFrozenWeight, MalformedTensorsAreRefusedNamingTheTensor) {
  const std::vector<std::uint8_t> good = random_blocks(GgmlType::Q4_K, 256, 4, 3);
  ASSERT_EQ(refusal(good, GgmlType::Q4_K, 256, 4), "");
  // A byte count that does not match type and shape.
  std::vector<std::uint8_t> short_by_one(good.begin(), good.end() - 1);
  EXPECT_NE(refusal(short_by_one, GgmlType::Q4_K, 256, 4).find("must be 576 bytes, got 575"),
            std::string::npos);
  EXPECT_NE(refusal(good, GgmlType::Q4_K, 256, 5).find("blk.3.attn_k.weight"), std::string::npos);
  // ne0 not a whole number of blocks; non-positive shapes.
  EXPECT_NE(refusal(good, GgmlType::Q4_K, 128, 8).find("blocks of 256"), std::string::npos);
  EXPECT_NE(refusal(good, GgmlType::Q4_K, 0, 4).find("> 0"), std::string::npos);
  EXPECT_NE(refusal(good, GgmlType::Q4_K, -256, -4).find("> 0"), std::string::npos);
  // Types lora does not dequantize, and numbers that are no ggml type.
  EXPECT_NE(refusal(good, GgmlType::Q2_K, 256, 4).find("q2_K"), std::string::npos);
  EXPECT_NE(refusal(good, static_cast<GgmlType>(4), 256, 4).find("unknown"), std::string::npos);
  // Non-finite fp16 scales: d, dmin of Q4_K, d of Q6_K and Q8_0 (infinity and NaN).
  for (auto [type, offset] : {std::pair{GgmlType::Q4_K, 0}, std::pair{GgmlType::Q4_K, 2},
                              std::pair{GgmlType::Q6_K, 208}, std::pair{GgmlType::Q8_0, 0}}) {
    std::vector<std::uint8_t> bytes = random_blocks(type, 256, 4, 4);
    const std::size_t at = lora::io::ggml_type_traits(type).type_size * 2 + std::size_t(offset);
    for (std::uint16_t bad : {std::uint16_t(0x7c00), std::uint16_t(0xfe01)}) {
      std::vector<std::uint8_t> b = bytes;
      std::memcpy(&b[at], &bad, 2);
      const std::string msg = refusal(b, type, 256, 4);
      EXPECT_NE(msg.find("blk.3.attn_k.weight"), std::string::npos) << msg;
      EXPECT_NE(msg.find("non-finite scale"), std::string::npos) << msg;
    }
  }
  // A non-finite F16 value.
  std::vector<std::uint8_t> f16(2 * 64 * 2, 0);
  f16[2 * 70 + 1] = 0x7c;
  EXPECT_NE(refusal(f16, GgmlType::F16, 64, 2).find("non-finite value"), std::string::npos);
}

TEST(GgmlFrozenWeight, QuantizeRefusesWhatTheFormatCannotHold) {
  MatrixXf W0 = random_matrix(4, 32, 1);
  EXPECT_THROW(GgmlFrozenWeight::quantize(W0, GgmlType::Q5_K), std::invalid_argument);
  EXPECT_THROW(GgmlFrozenWeight::quantize(MatrixXf(0, 32), GgmlType::Q8_0), std::invalid_argument);
  W0(1, 3) = 1e9f;  // Q8_0's scale 1e9 / 127 overflows fp16
  EXPECT_THROW(GgmlFrozenWeight::quantize(W0, GgmlType::Q8_0), std::domain_error);
  W0(1, 3) = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(GgmlFrozenWeight::quantize(W0, GgmlType::Q8_0), std::domain_error);
}

}  // namespace
}  // namespace test_ggml_frozen_weight
