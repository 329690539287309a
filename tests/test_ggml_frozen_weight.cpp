// GgmlFrozenWeight: llama.cpp's block formats as a frozen base. The blocks' values are ggml's (bit
// for bit: test_llama_cpp_reference); here the products (fused decoding kernel and panels, both
// orientations) against a plain product in double on the dequantized weight, the storage's layout
// against the row-by-row dequantizer, and every refusal of a malformed tensor. The layer-level
// contract is the conformance battery's (test_conformance, configuration Ggml).
#include "test_helpers.hpp"

#include <lora/ggml_frozen_weight.hpp>
#include <lora/lora.hpp>

#include <gtest/gtest.h>

#include <algorithm>
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

TEST(GgmlFrozenWeight, FusedDecodingKernelsMatchADoubleProductForEveryBatchUpToEight) {
  // The decoding kernels (n <= kSmallBatch; AVX-512 for Q8_0, Q4_0, Q4_K, Q6_K, several rows at
  // a time) on one and several blocks per row, row counts that are no multiple of the rows decoded
  // together (4 or 2), and every column count 1..8, against a double product on the dequantized
  // weight; the other types through the portable loop.
  for (GgmlType type : {GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_K, GgmlType::Q6_K,
                        GgmlType::Q5_0, GgmlType::Q5_K}) {
    const std::int64_t bs = lora::io::ggml_type_traits(type).block_size;
    for (std::int64_t blocks : {1, 3, 41}) {
      for (std::int64_t rows : {1, 2, 3, 5, 7, 130}) {
        const std::string what = std::string(lora::io::ggml_type_traits(type).name) + ", " +
                                 std::to_string(blocks) + " blocks, " + std::to_string(rows) +
                                 " rows";
        const std::int64_t k = bs * blocks;
        GgmlFrozenWeight w(random_blocks(type, k, rows, std::uint32_t(17 + rows + blocks)), type, k,
                           rows, "blk.0.ffn_down.weight", lora::MergeMode::ExactRestore,
                           lora::GgmlBackend::Portable);
        const MatrixXd W = w.dequantized().cast<double>();
        for (Eigen::Index n = 1; n <= GgmlFrozenWeight::kSmallBatch; ++n) {
          SCOPED_TRACE(what + ", n = " + std::to_string(n));
          const MatrixXd X = random_matrix(k, n, std::uint64_t(5 + n)).cast<double>();
          const MatrixXd bound = W.cwiseAbs() * X.cwiseAbs();
          MatrixXf H(rows, n);
          w.multiply(X.cast<float>(), H);
          expect_product_near(H, W * X, bound, "W X");
          MatrixXf H2 = MatrixXf::Constant(rows, n, 0.25f);
          w.multiply_add(X.cast<float>(), H2);
          expect_product_near(H2, (W * X).array() + 0.25, bound.array() + 0.25, "W X + H");
        }
      }
    }
  }
}

TEST(GgmlFrozenWeight, Bf16RowsAreTheFp32RowsRounded) {
  // What the oneDNN panels multiply: dequantize_row_bf16 = round_to_bf16(dequantize_row), bit for
  // bit, from any block boundary, for whole and partial runs of blocks.
  for (GgmlType type : {GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_K, GgmlType::Q6_K,
                        GgmlType::Q5_0, GgmlType::Q5_K}) {
    const std::int64_t bs = lora::io::ggml_type_traits(type).block_size;
    const std::int64_t k = bs * 12;
    const GgmlFrozenWeight w(random_blocks(type, k, 3, 29), type, k, 3, "blk.1.attn_v.weight",
                             lora::MergeMode::ExactRestore, lora::GgmlBackend::Portable);
    std::vector<float> f(static_cast<std::size_t>(k));
    std::vector<lora::detail::bf16> b(static_cast<std::size_t>(k) + 1);
    for (Eigen::Index row = 0; row < 3; ++row)
      for (Eigen::Index col0 : {Eigen::Index(0), Eigen::Index(bs), Eigen::Index(5 * bs)})
        for (Eigen::Index count : {Eigen::Index(1), Eigen::Index(17), Eigen::Index(bs),
                                   Eigen::Index(3 * bs + 5), Eigen::Index(k - col0)}) {
          if (col0 + count > k) continue;
          w.dequantize_row(row, col0, count, f.data());
          std::fill(b.begin(), b.end(), lora::detail::bf16(0xabcd));
          w.dequantize_row_bf16(row, col0, count, b.data());
          for (Eigen::Index i = 0; i < count; ++i)
            ASSERT_EQ(b[std::size_t(i)], lora::detail::round_to_bf16(f[std::size_t(i)]))
                << lora::io::ggml_type_traits(type).name << " row " << row << ", col0 " << col0
                << ", count " << count << ", i " << i;
          ASSERT_EQ(b[std::size_t(count)], 0xabcd) << "wrote past count";
        }
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
