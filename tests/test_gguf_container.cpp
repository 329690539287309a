// The GGUF container against ggml's own GGUF code (gguf.h in llama.cpp's libggml-base): files
// written by ggml are read by lora, files written by lora are read by ggml, and for the same
// content the two writers produce the same bytes. Malformed files are FormatErrors naming the
// field and offset, and ggml refuses each of them too (so the cases are real, not lora's taste).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "../fuzz/gguf_harness.hpp"
#include "ggml.h"
#include "gguf.h"
#include "gguf_test_files.hpp"
#include "lora/io/gguf.hpp"
#include "lora/io/gguf_writer.hpp"

namespace test_gguf_container {

using gguf_test::read_bytes;
using gguf_test::tmp_path;
using lora::io::FormatError;
using lora::io::GgmlType;
using lora::io::GgufFile;
using lora::io::GgufType;
using lora::io::GgufValue;
using lora::io::GgufWriter;

// One matrix of each convertible type, rows x cols (out x in), values of a fixed pattern.
Eigen::MatrixXf pattern(int rows, int cols, float phase) {
  Eigen::MatrixXf m(rows, cols);
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) m(i, j) = std::sin(phase + 0.37f * i + 0.11f * j) * 1.5f;
  return m;
}

struct GgmlCtx {
  ggml_context* ctx;
  gguf_context* gguf;
  GgmlCtx() {
    ggml_init_params p{64 * 1024 * 1024, nullptr, false};
    ctx = ggml_init(p);
    gguf = gguf_init_empty();
  }
  ~GgmlCtx() {
    gguf_free(gguf);
    ggml_free(ctx);
  }
  // A 2-D tensor of `type` holding m (out x in) with ne = [in, out], converted by ggml.
  void add(const char* name, const Eigen::MatrixXf& m, ggml_type type) {
    ggml_tensor* t = ggml_new_tensor_2d(ctx, type, m.cols(), m.rows());
    ggml_set_name(t, name);
    const Eigen::Matrix<float, -1, -1, Eigen::RowMajor> rm = m;
    if (type == GGML_TYPE_F32) {
      std::memcpy(t->data, rm.data(), static_cast<std::size_t>(rm.size()) * 4);
    } else if (type == GGML_TYPE_F16) {
      ggml_fp32_to_fp16_row(rm.data(), static_cast<ggml_fp16_t*>(t->data), rm.size());
    } else if (type == GGML_TYPE_BF16) {
      ggml_fp32_to_bf16_row_ref(rm.data(), static_cast<ggml_bf16_t*>(t->data), rm.size());
    } else {
      ggml_quantize_chunk(type, rm.data(), t->data, 0, m.rows(), m.cols(), nullptr);
    }
    gguf_add_tensor(gguf, t);
  }
};

// Every kind of value and four tensor types, set the same way through both APIs.
void fill_ggml(GgmlCtx& g) {
  gguf_set_val_str(g.gguf, "general.architecture", "llama");
  gguf_set_val_u8(g.gguf, "t.u8", 200);
  gguf_set_val_i8(g.gguf, "t.i8", -100);
  gguf_set_val_u16(g.gguf, "t.u16", 60000);
  gguf_set_val_i16(g.gguf, "t.i16", -30000);
  gguf_set_val_u32(g.gguf, "t.u32", 4000000000u);
  gguf_set_val_i32(g.gguf, "t.i32", -2000000000);
  gguf_set_val_f32(g.gguf, "t.f32", 1e-5f);
  gguf_set_val_bool(g.gguf, "t.bool", true);
  gguf_set_val_u64(g.gguf, "t.u64", 1ull << 40);
  gguf_set_val_i64(g.gguf, "t.i64", -(1ll << 40));
  gguf_set_val_f64(g.gguf, "t.f64", 3.25);
  const float fa[3] = {1.5f, -2.0f, 0.25f};
  gguf_set_arr_data(g.gguf, "t.arr_f32", GGUF_TYPE_FLOAT32, fa, 3);
  const std::int32_t ia[2] = {7, -9};
  gguf_set_arr_data(g.gguf, "t.arr_i32", GGUF_TYPE_INT32, ia, 2);
  const char* sa[3] = {"<unk>", "", "<0x0A>"};
  gguf_set_arr_str(g.gguf, "t.arr_str", sa, 3);
  g.add("w.f32", pattern(3, 5, 0.f), GGML_TYPE_F32);
  g.add("w.f16", pattern(4, 6, 1.f), GGML_TYPE_F16);
  g.add("w.bf16", pattern(2, 7, 2.f), GGML_TYPE_BF16);
  g.add("w.q8_0", pattern(3, 64, 3.f), GGML_TYPE_Q8_0);
}

void fill_lora(GgufWriter& w) {
  w.set_value("general.architecture", std::string("llama"));
  w.set_value("t.u8", std::uint8_t{200});
  w.set_value("t.i8", std::int8_t{-100});
  w.set_value("t.u16", std::uint16_t{60000});
  w.set_value("t.i16", std::int16_t{-30000});
  w.set_value("t.u32", std::uint32_t{4000000000u});
  w.set_value("t.i32", std::int32_t{-2000000000});
  w.set_value("t.f32", 1e-5f);
  w.set_value("t.bool", true);
  w.set_value("t.u64", std::uint64_t{1ull << 40});
  w.set_value("t.i64", std::int64_t{-(1ll << 40)});
  w.set_value("t.f64", 3.25);
  w.set("t.arr_f32", GgufValue::array(std::vector<float>{1.5f, -2.0f, 0.25f}));
  w.set("t.arr_i32", GgufValue::array(std::vector<std::int32_t>{7, -9}));
  w.set("t.arr_str", GgufValue::array(std::vector<std::string>{"<unk>", "", "<0x0A>"}));
  w.add_matrix("w.f32", pattern(3, 5, 0.f), GgmlType::F32);
  w.add_matrix("w.f16", pattern(4, 6, 1.f), GgmlType::F16);
  w.add_matrix("w.bf16", pattern(2, 7, 2.f), GgmlType::BF16);
  w.add_matrix("w.q8_0", pattern(3, 64, 3.f), GgmlType::Q8_0);
}

TEST(GgufContainer, ReadsWhatGgmlWrites) {
  GgmlCtx g;
  fill_ggml(g);
  const std::string path = tmp_path("ggml_written.gguf");
  ASSERT_TRUE(gguf_write_to_file(g.gguf, path.c_str(), false));

  const GgufFile f = GgufFile::load(path);
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.alignment(), 32u);
  gguf_init_params meta_only{true, nullptr};
  gguf_context* reread = gguf_init_from_file(path.c_str(), meta_only);
  ASSERT_NE(reread, nullptr);
  EXPECT_EQ(f.data_offset(), gguf_get_data_offset(reread));
  gguf_free(reread);
  ASSERT_EQ(f.metadata().size(), static_cast<std::size_t>(gguf_get_n_kv(g.gguf)));
  EXPECT_EQ(f.get<std::string>("general.architecture"), "llama");
  EXPECT_EQ(f.get<std::uint8_t>("t.u8"), 200);
  EXPECT_EQ(f.get<std::int8_t>("t.i8"), -100);
  EXPECT_EQ(f.get<std::uint16_t>("t.u16"), 60000);
  EXPECT_EQ(f.get<std::int16_t>("t.i16"), -30000);
  EXPECT_EQ(f.get<std::uint32_t>("t.u32"), 4000000000u);
  EXPECT_EQ(f.get<std::int32_t>("t.i32"), -2000000000);
  EXPECT_EQ(f.get<float>("t.f32"), 1e-5f);
  EXPECT_EQ(f.get<bool>("t.bool"), true);
  EXPECT_EQ(f.get<std::uint64_t>("t.u64"), 1ull << 40);
  EXPECT_EQ(f.get<std::int64_t>("t.i64"), -(1ll << 40));
  EXPECT_EQ(f.get<double>("t.f64"), 3.25);
  EXPECT_EQ(f.get_array<float>("t.arr_f32"), (std::vector<float>{1.5f, -2.0f, 0.25f}));
  EXPECT_EQ(f.get_array<std::int32_t>("t.arr_i32"), (std::vector<std::int32_t>{7, -9}));
  EXPECT_EQ(f.get_array<std::string>("t.arr_str"),
            (std::vector<std::string>{"<unk>", "", "<0x0A>"}));
  // Exact types, as llama.cpp reads them: a u32 is not an f32.
  EXPECT_THROW(f.get<float>("t.u32"), FormatError);
  EXPECT_THROW(f.get<std::int32_t>("t.u32"), FormatError);
  EXPECT_THROW(f.get<std::uint32_t>("no.such.key"), FormatError);
  EXPECT_EQ(f.get_or<std::uint32_t>("no.such.key", 7u), 7u);

  ASSERT_EQ(f.tensors().size(), 4u);
  for (std::int64_t i = 0; i < gguf_get_n_tensors(g.gguf); ++i) {
    const std::string name = gguf_get_tensor_name(g.gguf, i);
    const auto& info = f.tensors()[static_cast<std::size_t>(i)];
    EXPECT_EQ(info.name, name);
    EXPECT_EQ(info.offset, gguf_get_tensor_offset(g.gguf, i));
    EXPECT_EQ(info.bytes, gguf_get_tensor_size(g.gguf, i));
    EXPECT_EQ(static_cast<int>(info.type), static_cast<int>(gguf_get_tensor_type(g.gguf, i)));
    // Values: ggml's own conversion of the stored bytes, element for element.
    const ggml_tensor* t = ggml_get_tensor(g.ctx, name.c_str());
    std::vector<float> theirs(static_cast<std::size_t>(ggml_nelements(t)));
    if (t->type == GGML_TYPE_F32)
      std::memcpy(theirs.data(), t->data, theirs.size() * 4);
    else
      ggml_get_type_traits(t->type)->to_float(t->data, theirs.data(), ggml_nelements(t));
    const Eigen::MatrixXf ours = f.matrix<float>(name);
    ASSERT_EQ(ours.rows(), t->ne[1]);
    ASSERT_EQ(ours.cols(), t->ne[0]);
    for (int r = 0; r < ours.rows(); ++r)
      for (int c = 0; c < ours.cols(); ++c)
        EXPECT_EQ(ours(r, c), theirs[static_cast<std::size_t>(r * ours.cols() + c)]) << name;
  }
}

TEST(GgufContainer, WritesGgmlsBytes) {
  GgmlCtx g;
  fill_ggml(g);
  const std::string theirs_path = tmp_path("ggml_bytes.gguf");
  ASSERT_TRUE(gguf_write_to_file(g.gguf, theirs_path.c_str(), false));
  GgufWriter w;
  fill_lora(w);
  const std::string ours_path = tmp_path("lora_bytes.gguf");
  w.save(ours_path);
  EXPECT_EQ(read_bytes(ours_path), read_bytes(theirs_path));
}

TEST(GgufContainer, GgmlReadsWhatLoraWrites) {
  GgufWriter w;
  w.set_value(lora::io::kGgufAlignmentKey, std::uint32_t{64});
  fill_lora(w);
  const std::string path = tmp_path("lora_for_ggml.gguf");
  w.save(path);
  ggml_context* data_ctx = nullptr;
  gguf_init_params p{false, &data_ctx};
  gguf_context* g = gguf_init_from_file(path.c_str(), p);
  ASSERT_NE(g, nullptr);
  EXPECT_EQ(gguf_get_alignment(g), 64u);
  EXPECT_EQ(gguf_get_val_u32(g, gguf_find_key(g, "t.u32")), 4000000000u);
  EXPECT_EQ(gguf_get_kv_type(g, gguf_find_key(g, "t.f32")), GGUF_TYPE_FLOAT32);
  EXPECT_EQ(gguf_get_val_f32(g, gguf_find_key(g, "t.f32")), 1e-5f);
  EXPECT_STREQ(gguf_get_arr_str(g, gguf_find_key(g, "t.arr_str"), 2), "<0x0A>");
  const GgufFile f = GgufFile::load(path);
  EXPECT_EQ(f.alignment(), 64u);
  for (const auto& info : f.tensors()) {
    const ggml_tensor* t = ggml_get_tensor(data_ctx, info.name.c_str());
    ASSERT_NE(t, nullptr) << info.name;
    EXPECT_EQ(t->ne[0], info.cols());
    EXPECT_EQ(t->ne[1], info.rows());
    EXPECT_EQ(0, std::memcmp(t->data, f.data(info.name), info.bytes)) << info.name;
  }
  // The matrix written is the matrix read, to the type's rounding; f32 exactly.
  EXPECT_EQ(f.matrix<float>("w.f32"), pattern(3, 5, 0.f));
  EXPECT_LE((f.matrix<float>("w.f16") - pattern(4, 6, 1.f)).cwiseAbs().maxCoeff(), 1e-3f);
  EXPECT_LE((f.matrix<float>("w.bf16") - pattern(2, 7, 2.f)).cwiseAbs().maxCoeff(), 1e-2f);
  EXPECT_LE((f.matrix<double>("w.q8_0") - pattern(3, 64, 3.f).cast<double>()).cwiseAbs().maxCoeff(),
            1.5 / 127);
  gguf_free(g);
  ggml_free(data_ctx);
}

TEST(GgufContainer, WriterRefusesWhatLlamaCppCannotRead) {
  GgufWriter w;
  EXPECT_THROW(w.set("", GgufValue::of(1.0f)), std::invalid_argument);
  EXPECT_THROW(w.set_value(lora::io::kGgufAlignmentKey, 32.0f), std::invalid_argument);
  EXPECT_THROW(w.set_value(lora::io::kGgufAlignmentKey, std::uint32_t{48}), std::invalid_argument);
  EXPECT_THROW(w.add_matrix(std::string(64, 'x'), Eigen::MatrixXf::Zero(2, 2), GgmlType::F32),
               std::invalid_argument);
  w.add_matrix("a", Eigen::MatrixXf::Zero(2, 2), GgmlType::F32);
  EXPECT_THROW(w.add_matrix("a", Eigen::MatrixXf::Zero(2, 2), GgmlType::F32),
               std::invalid_argument);
  EXPECT_THROW(w.add_matrix("q", Eigen::MatrixXf::Zero(2, 48), GgmlType::Q8_0),
               std::invalid_argument);
  EXPECT_THROW(w.add_matrix("k", Eigen::MatrixXf::Zero(2, 256), GgmlType::Q2_K),
               std::invalid_argument);  // a type lora does not quantize into
  EXPECT_THROW(w.add_matrix("k4", Eigen::MatrixXf::Zero(2, 128), GgmlType::Q4_K),
               std::invalid_argument);  // rows of 128 values: half a Q4_K super-block
  EXPECT_THROW(w.add_matrix("big", Eigen::MatrixXf::Constant(1, 32, 1e7f), GgmlType::Q8_0),
               std::domain_error);  // its scale, 1e7 / 127, overflows fp16
  EXPECT_THROW(w.add_matrix("h", Eigen::MatrixXf::Constant(1, 1, 1e5f), GgmlType::F16),
               std::domain_error);
  EXPECT_THROW(w.add_matrix("n", Eigen::MatrixXf::Constant(1, 1, NAN), GgmlType::F32),
               std::domain_error);
  EXPECT_THROW(w.add_tensor("r", GgmlType::F32, {2, 2}, std::vector<std::uint8_t>(15)),
               std::invalid_argument);
  EXPECT_THROW(w.add_tensor("d", GgmlType::F32, {1, 1, 1, 1, 1}, std::vector<std::uint8_t>(4)),
               std::invalid_argument);
  EXPECT_EQ(w.size(), 1u);
}

TEST(GgufContainer, FailedSaveLeavesThePreviousFile) {
  const std::string path = tmp_path("atomic.gguf");
  GgufWriter first;
  first.set_value("general.name", std::string("first"));
  first.save(path);
  const auto before = read_bytes(path);
  GgufWriter second;
  second.set_value("general.name", std::string("second"));
  for (auto step : {lora::io::detail::WriteStep::Write, lora::io::detail::WriteStep::Rename}) {
    lora::io::detail::injected_write_failure = step;
    EXPECT_THROW(second.save(path), lora::io::WriteError);
    EXPECT_EQ(read_bytes(path), before);
  }
}

// A malformed file: lora refuses it with a FormatError whose message has `needle`, and ggml's
// own loader refuses it too.
void expect_refused(const std::vector<std::uint8_t>& bytes, const std::string& needle) {
  SCOPED_TRACE(needle);
  try {
    GgufFile::parse(bytes, "hostile");
    ADD_FAILURE() << "lora accepted it";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("byte offset"), std::string::npos) << e.what();
  }
  // no_alloc false: ggml reads the data too, so that a tensor past the end is found.
  ggml_context* data = nullptr;
  gguf_init_params p{false, &data};
  gguf_context* g = gguf_init_from_buffer(bytes.data(), bytes.size(), p);
  EXPECT_EQ(g, nullptr) << "ggml accepted it";
  if (g) gguf_free(g);
  if (data) ggml_free(data);
}

TEST(GgufContainer, RefusesEachHostileClass) {
  using gguf_test::Raw;
  for (const auto& [name, bytes, needle] : gguf_test::hostile_files()) {
    SCOPED_TRACE(name);
    expect_refused(bytes, needle);
  }
  // And the well-formed file they are all variations of is read by both.
  const auto good = Raw::valid().bytes();
  EXPECT_NO_THROW(GgufFile::parse(good));
  gguf_init_params p{true, nullptr};
  gguf_context* g = gguf_init_from_buffer(good.data(), good.size(), p);
  EXPECT_NE(g, nullptr);
  if (g) gguf_free(g);
}

TEST(GgufContainer, RefusesAnElementCountThatWrapsToZero) {
  // ne = [2^32, 2^32]: 2^64 elements, which wrap to 0 in ggml's int64 product (ggml's own loader
  // then takes it as an empty tensor); lora counts without wrapping and refuses it.
  const auto bytes = gguf_test::Raw()
                         .header(1, 0)
                         .info("w", {std::int64_t{1} << 32, std::int64_t{1} << 32}, 0, 0)
                         .pad()
                         .data(32)
                         .bytes();
  EXPECT_THROW(GgufFile::parse(bytes), FormatError);
}

TEST(GgufContainer, HandsOutRawBlocksOfTypesItCannotConvert) {
  GgufWriter w;
  std::vector<std::uint8_t> blocks(2 * 84, 0x11);  // two Q2_K blocks (256 values each)
  w.add_tensor("k", GgmlType::Q2_K, {256, 2}, blocks);
  const GgufFile f = GgufFile::parse(w.serialize());
  EXPECT_EQ(f.raw("k"), blocks);
  EXPECT_FALSE(GgufFile::can_convert(GgmlType::Q2_K));
  EXPECT_TRUE(GgufFile::can_convert(GgmlType::Q4_K));
  try {
    f.matrix<float>("k");
    ADD_FAILURE();
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("cannot dequantize"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("q2_K"), std::string::npos) << e.what();
  }
}

// The fuzz target's inputs (fuzz/make_gguf_inputs.py), through the fuzz target's own harness: every
// seed is accepted (and survives the writer round trip and the file comparison), every hostile
// file is refused with a FormatError. Under ASan/UBSan this is the fuzzer's check without
// libFuzzer.
namespace test_gguf_fuzz_inputs {

std::vector<std::filesystem::path> files_in(const std::filesystem::path& dir) {
  std::vector<std::filesystem::path> out;
  for (const auto& e : std::filesystem::directory_iterator(dir))
    if (e.is_regular_file() && e.path().extension() == ".gguf") out.push_back(e.path());
  return out;
}

TEST(GgufFuzzInputs, EverySeedIsAccepted) {
  const auto seeds = files_in(std::filesystem::path(LORA_FUZZ_DIR) / "seeds" / "gguf");
  ASSERT_GE(seeds.size(), 4u);
  for (const auto& f : seeds) {
    SCOPED_TRACE(f.string());
    const auto bytes = gguf_test::read_bytes(f.string());
    EXPECT_NO_THROW(lora::fuzz::exercise_gguf(bytes.data(), bytes.size(),
                                              gguf_test::tmp_path("fuzz_scratch.gguf")));
  }
}

TEST(GgufFuzzInputs, EveryRegressionIsAFormatError) {
  // Files named accepted-* were found by the fuzzer and are valid files (the bug was in lora):
  // they must be accepted; every other one is a hostile class that must be refused.
  const auto files = files_in(std::filesystem::path(LORA_FUZZ_DIR) / "regressions" / "gguf");
  ASSERT_GE(files.size(), 25u);
  for (const auto& f : files) {
    SCOPED_TRACE(f.string());
    const auto bytes = gguf_test::read_bytes(f.string());
    const std::string scratch = gguf_test::tmp_path("fuzz_scratch.gguf");
    if (f.filename().string().rfind("accepted-", 0) == 0) {
      EXPECT_NO_THROW(lora::fuzz::exercise_gguf(bytes.data(), bytes.size(), scratch));
    } else {
      EXPECT_THROW(lora::fuzz::exercise_gguf(bytes.data(), bytes.size(), scratch), FormatError);
    }
  }
}

}  // namespace test_gguf_fuzz_inputs
}  // namespace test_gguf_container
