// Base weights from GGUF: a tiny llama written by lora's writer loads in llama.cpp and runs;
// weights written by ggml's own GGUF writer (a file from outside the project) come into lora's
// frozen storages as ggml itself converts them (F32, F16, BF16, Q8_0); the k-quants are refused
// with a clear message and their raw blocks handed out.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "ggml.h"
#include "gguf.h"
#include "gguf_test_files.hpp"
#include "llama_cpp_client.hpp"
#include "lora/gguf.hpp"
#include "tiny_llama.hpp"

namespace test_gguf_base {

using lora::io::GgmlType;
using lora::io::GgufFile;

TEST(GgufBase, TinyLlamaWrittenByLoraRunsInLlamaCpp) {
  const auto model = tiny_llama::make();
  const std::string path = gguf_test::tmp_path("tiny_base.gguf");
  tiny_llama::writer(model).save(path);
  llama_cpp::Model m(path);
  EXPECT_EQ(m.n_vocab(), 259);
  const Eigen::MatrixXd lp = m.log_probs(tiny_llama::prompt());
  ASSERT_EQ(lp.cols(), static_cast<Eigen::Index>(tiny_llama::prompt().size()));
  EXPECT_TRUE(lp.allFinite());
  for (Eigen::Index i = 0; i < lp.cols(); ++i) {
    double total = 0;  // a plain loop: GCC 12 warns inside Eigen's AVX-512 exp
    for (Eigen::Index v = 0; v < lp.rows(); ++v) total += std::exp(lp(v, i));
    EXPECT_NEAR(total, 1.0, 1e-9);
    // Far from uniform (log 259 = 5.56): the weights carry information.
    EXPECT_GT(lp.col(i).maxCoeff() - lp.col(i).minCoeff(), 2.0) << i;
  }
  // Each block's weights matter: a model with one weight changed gives other numbers.
  auto changed = model.weights;
  changed["blk.1.ffn_down.weight"] *= 1.5f;
  const std::string path2 = gguf_test::tmp_path("tiny_base_changed.gguf");
  tiny_llama::writer(model, GgmlType::F32, changed).save(path2);
  llama_cpp::Model m2(path2);
  EXPECT_GT((m2.log_probs(tiny_llama::prompt()) - lp).cwiseAbs().maxCoeff(), 1e-2);
}

TEST(GgufBase, ReadsGgmlWrittenWeightsIntoFrozenStorages) {
  // A file written by ggml's own writer: one weight of each convertible type.
  ggml_init_params p{16 * 1024 * 1024, nullptr, false};
  ggml_context* ctx = ggml_init(p);
  gguf_context* g = gguf_init_empty();
  gguf_set_val_str(g, "general.architecture", "llama");
  const int out = 8, in = 64;
  std::vector<float> x(static_cast<std::size_t>(out * in));
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::cos(0.7f * static_cast<float>(i)) * 0.3f;
  const ggml_type types[] = {GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0,
                             GGML_TYPE_Q4_K};
  const char* names[] = {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight",
                         "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"};
  for (int i = 0; i < 5; ++i) {
    const int cols = types[i] == GGML_TYPE_Q4_K ? 256 : in;
    std::vector<float> src(static_cast<std::size_t>(out * cols));
    for (std::size_t j = 0; j < src.size(); ++j) src[j] = x[j % x.size()];
    ggml_tensor* t = ggml_new_tensor_2d(ctx, types[i], cols, out);
    ggml_set_name(t, names[i]);
    ggml_quantize_chunk(types[i], src.data(), t->data, 0, out, cols, nullptr);
    gguf_add_tensor(g, t);
  }
  const std::string path = gguf_test::tmp_path("ggml_weights.gguf");
  ASSERT_TRUE(gguf_write_to_file(g, path.c_str(), false));

  const GgufFile f = GgufFile::load(path);
  for (int i = 0; i < 4; ++i) {
    SCOPED_TRACE(names[i]);
    const ggml_tensor* t = ggml_get_tensor(ctx, names[i]);
    std::vector<float> theirs(static_cast<std::size_t>(out * in));
    if (types[i] == GGML_TYPE_F32)
      std::memcpy(theirs.data(), t->data, theirs.size() * 4);
    else
      ggml_get_type_traits(types[i])->to_float(t->data, theirs.data(), out * in);
    const Eigen::MatrixXf expected =
        Eigen::Map<Eigen::Matrix<float, -1, -1, Eigen::RowMajor>>(theirs.data(), out, in);
    const auto dense = lora::gguf::read_dense_weight<float>(f, names[i]);
    EXPECT_EQ(dense.weight(), expected);
    const auto dense64 = lora::gguf::read_dense_weight<double>(f, names[i]);
    EXPECT_EQ(dense64.weight(), expected.cast<double>());
    const auto bf16 = lora::gguf::read_bf16_weight(f, names[i]);
    if (types[i] == GGML_TYPE_BF16) {
      EXPECT_EQ(bf16.weight(), expected);  // bit for bit
    }
    EXPECT_LE((bf16.weight() - expected).cwiseAbs().maxCoeff(), 0.3f / 128);
    // A layer on the read base trains and runs as any other.
    lora::LoRAConfig cfg;
    cfg.rank = 4;
    lora::LoRALinear<float> layer(lora::gguf::read_matrix<float>(f, names[i]), cfg);
    EXPECT_EQ(layer.out_features(), out);
    EXPECT_EQ(layer.in_features(), in);
  }
  const auto weights = lora::gguf::read_weights<float>(f, {names[0], names[3]});
  EXPECT_EQ(weights.size(), 2u);
  // Q4_K: dequantized as ggml's to_float does, bit for bit, or kept as stored (GgmlFrozenWeight:
  // the raw blocks as ggml wrote them).
  const ggml_tensor* k = ggml_get_tensor(ctx, names[4]);
  std::vector<float> theirs(static_cast<std::size_t>(out * 256));
  ggml_get_type_traits(GGML_TYPE_Q4_K)->to_float(k->data, theirs.data(), out * 256);
  const Eigen::MatrixXf q4k =
      Eigen::Map<Eigen::Matrix<float, -1, -1, Eigen::RowMajor>>(theirs.data(), out, 256);
  EXPECT_EQ(lora::gguf::read_dense_weight<float>(f, names[4]).weight(), q4k);
  const lora::GgmlFrozenWeight blocks = lora::gguf::read_ggml_weight(f, names[4]);
  EXPECT_EQ(blocks.type(), GgmlType::Q4_K);
  EXPECT_EQ(blocks.packed_bytes(), ggml_nbytes(k));
  EXPECT_EQ(blocks.weight(), q4k);
  EXPECT_EQ(0, std::memcmp(f.data(names[4]), k->data, ggml_nbytes(k)));
  EXPECT_THROW(lora::gguf::read_matrix<float>(f, "blk.9.attn_q.weight"), lora::io::FormatError);
  gguf_free(g);
  ggml_free(ctx);
}

TEST(GgufBase, NonFiniteWeightsAreRefusedNamingTheTensor) {
  // A Q4_K block whose fp16 d is infinity, and an F16 weight holding a NaN: corrupt weights.
  std::vector<std::uint8_t> q4k(144, 0x11);
  q4k[0] = 0x00;
  q4k[1] = 0x7c;
  lora::io::GgufWriter w;
  w.add_tensor("blk.0.attn_q.weight", GgmlType::Q4_K, {256, 1}, q4k);
  w.add_tensor("blk.0.attn_k.weight", GgmlType::F16, {2, 1}, {0x00, 0x3c, 0x00, 0x7e});
  const GgufFile f = GgufFile::parse(w.serialize());
  for (const char* name : {"blk.0.attn_q.weight", "blk.0.attn_k.weight"}) {
    try {
      lora::gguf::read_matrix<float>(f, name);
      ADD_FAILURE() << name << " read";
    } catch (const lora::io::FormatError& e) {
      EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("finite"), std::string::npos) << e.what();
    }
    EXPECT_THROW(lora::gguf::read_dense_weight<double>(f, name), lora::io::FormatError) << name;
    EXPECT_THROW(lora::gguf::read_ggml_weight(f, name), lora::io::FormatError) << name;
  }
  // The container still hands the values out as ggml decodes them.
  EXPECT_TRUE(std::isinf(f.values<float>("blk.0.attn_q.weight")[0]) ||
              std::isnan(f.values<float>("blk.0.attn_q.weight")[0]));
}

TEST(GgufBase, CopyOfAFileGivesItsBytesBack) {
  const auto model = tiny_llama::make();
  const auto bytes = tiny_llama::writer(model).serialize();
  const GgufFile f = GgufFile::parse(bytes);
  EXPECT_EQ(lora::io::GgufWriter::copy_of(f).serialize(), bytes);
  // And a replaced weight reads back replaced, in place.
  auto w = lora::io::GgufWriter::copy_of(f);
  const Eigen::MatrixXf Wq = Eigen::MatrixXf::Constant(64, 64, 0.5f);
  w.replace_matrix("blk.0.attn_q.weight", Wq, GgmlType::F16);
  const GgufFile g = GgufFile::parse(w.serialize());
  EXPECT_EQ(g.matrix<float>("blk.0.attn_q.weight"), Wq);
  EXPECT_EQ(g.info("blk.0.attn_q.weight").type, GgmlType::F16);
  EXPECT_EQ(g.tensors()[2].name, "blk.0.attn_q.weight");
}

}  // namespace test_gguf_base
