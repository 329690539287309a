// The safetensors reader: real files written by PyTorch/PEFT, exact half-precision conversions,
// and every kind of corrupt file rejected with a FormatError that says what was wrong.
#include "test_helpers.hpp"

#include <lora/io/safetensors.hpp>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace test_safetensors {
namespace {

using lora::io::FormatError;
using lora::io::SafeTensors;

/// A safetensors file from a header string and a data section.
std::vector<std::uint8_t> make_file(const std::string& header,
                                    const std::vector<std::uint8_t>& data,
                                    std::uint64_t header_len_override = 0) {
  std::vector<std::uint8_t> out(8);
  const std::uint64_t n = header_len_override ? header_len_override : header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<std::uint8_t>(n >> (8 * i));
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

std::vector<std::uint8_t> float_bytes(std::initializer_list<float> values) {
  std::vector<std::uint8_t> out(values.size() * 4);
  std::size_t i = 0;
  for (float v : values) std::memcpy(out.data() + 4 * i++, &v, 4);
  return out;
}

void expect_format_error(const std::vector<std::uint8_t>& bytes, const std::string& part) {
  try {
    SafeTensors::parse(bytes, "test.safetensors");
    ADD_FAILURE() << "expected FormatError mentioning \"" << part << "\"";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
  }
}

TEST(SafeTensorsRead, PeftFixtureHasExpectedTensors) {
  const auto st = SafeTensors::load(lora::test::fixture_path("peft/f64_basic.safetensors"));
  EXPECT_TRUE(st.contains("W0"));
  EXPECT_EQ(st.info("W0").dtype, lora::io::DType::F64);
  EXPECT_EQ(st.info("W0").shape, (std::vector<std::int64_t>{10, 12}));
  const Eigen::MatrixXd W0 = st.matrix<double>("W0");
  EXPECT_EQ(W0.rows(), 10);
  EXPECT_EQ(W0.cols(), 12);
  // Row-major in the file: the second value stored is W0(0, 1), not W0(1, 0).
  const auto flat = st.values<double>("W0");
  EXPECT_EQ(W0(0, 1), flat[1]);
  EXPECT_EQ(W0(1, 0), flat[12]);
}

TEST(SafeTensorsRead, SmallHandMadeFileWithMetadata) {
  const std::string header =
      R"({"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}})";
  const auto st = SafeTensors::parse(make_file(header, float_bytes({1, 2, 3, 4, 5, 6})));
  Eigen::MatrixXf expected(2, 3);
  expected << 1, 2, 3, 4, 5, 6;
  EXPECT_TRUE(st.matrix<float>("w") == expected);
  EXPECT_EQ(st.metadata().at("format"), "pt");
  EXPECT_EQ(st.names(), std::vector<std::string>{"w"});
}

TEST(HalfPrecision, Bf16AndF16ConversionsAreExactAndRoundToNearestEven) {
  using namespace lora::io;
  EXPECT_EQ(bf16_to_float(0x3f80), 1.0f);
  EXPECT_EQ(bf16_to_float(0xc000), -2.0f);
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  // 1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to the even one (1).
  EXPECT_EQ(float_to_bf16(1.0f + 0x1.0p-8f), 0x3f80);
  EXPECT_EQ(float_to_bf16(1.0f + 3 * 0x1.0p-8f), 0x3f82);           // halfway, rounds up to even
  EXPECT_EQ(float_to_bf16(1.0f + 0x1.0p-8f + 0x1.0p-20f), 0x3f81);  // above halfway
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::nanf("")))));

  EXPECT_EQ(f16_to_float(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_float(0xc000), -2.0f);
  EXPECT_EQ(f16_to_float(0x7bff), 65504.0f);
  EXPECT_EQ(f16_to_float(0x0001), 0x1.0p-24f);  // smallest subnormal
  EXPECT_TRUE(std::isinf(f16_to_float(0x7c00)));
  EXPECT_EQ(float_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(float_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(float_to_f16(65520.0f), 0x7c00);  // rounds past the largest half: infinity
  EXPECT_EQ(float_to_f16(0x1.0p-24f), 0x0001);
  EXPECT_EQ(float_to_f16(1.0f + 0x1.0p-11f), 0x3c00);  // tie to even
  EXPECT_EQ(float_to_f16(1.0f + 3 * 0x1.0p-11f), 0x3c02);
  // Every finite half survives a round trip through float.
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const float f = f16_to_float(static_cast<std::uint16_t>(h));
    if (std::isfinite(f)) {
      EXPECT_EQ(float_to_f16(f), h) << h;
    }
  }
}

TEST(SafeTensorsRead, HalfTypesConvertToFloat) {
  const std::string header =
      R"({"h":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},"b":{"dtype":"BF16","shape":[2],"data_offsets":[4,8]}})";
  const std::vector<std::uint8_t> data = {0x00, 0x3c, 0x00, 0xc0, 0x80, 0x3f, 0x00, 0x40};
  const auto st = SafeTensors::parse(make_file(header, data));
  EXPECT_EQ(st.vector<float>("h"), Eigen::Vector2f(1.0f, -2.0f));
  EXPECT_EQ(st.vector<double>("b"), Eigen::Vector2d(1.0, 2.0));
}

TEST(SafeTensorsCorrupt, EveryDefectIsAClearError) {
  const auto data = float_bytes({1, 2, 3, 4});
  const std::string ok = R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})";
  ASSERT_NO_THROW(SafeTensors::parse(make_file(ok, data)));

  expect_format_error({1, 2, 3}, "shorter than the 8-byte header length");
  expect_format_error(make_file(ok, data, 1u << 20), "runs past the end of the file");
  expect_format_error(make_file(ok, data, 1ull << 40), "exceeds the 100 MB limit");
  auto truncated = make_file(ok, data);
  truncated.resize(truncated.size() - 3);
  expect_format_error(truncated, "run past the data section");
  expect_format_error(make_file(R"({"w":{"dtype":"F32","shape":[2,2],)", data), "not valid JSON");
  expect_format_error(make_file("[1,2]", data), "must be a JSON object");
  expect_format_error(
      make_file(R"({"w":{"dtype":"Q7","shape":[2,2],"data_offsets":[0,16]}})", data),
      "unknown dtype");
  expect_format_error(
      make_file(R"({"w":{"dtype":"F64","shape":[2,2],"data_offsets":[0,16]}})", data),
      "needs 32 bytes");
  expect_format_error(
      make_file(R"({"w":{"dtype":"F32","shape":[2,-2],"data_offsets":[0,16]}})", data),
      "non-negative");
  expect_format_error(
      make_file(R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[8,0]}})", data),
      "end before they begin");
  expect_format_error(
      make_file(R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[4,20]}})", data),
      "run past the data section");
  expect_format_error(make_file(R"({"w":{"dtype":"F32","shape":[2,2]}})", data), "missing");
  expect_format_error(
      make_file(
          R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
          data),
      "overlap");
  expect_format_error(
      make_file(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,16]}})",
                data),
      "overflows");
  expect_format_error(make_file(R"({"__metadata__":{"a":1}})", {}), "must be a string");

  // A valid file asked for something it does not hold.
  const auto st = SafeTensors::parse(make_file(ok, data), "ok.safetensors");
  EXPECT_THROW(st.matrix<float>("missing"), FormatError);
  EXPECT_THROW(st.vector<float>("w"), FormatError);  // 2-D, not 1-D
  const auto ints = SafeTensors::parse(
      make_file(R"({"i":{"dtype":"I32","shape":[4],"data_offsets":[0,16]}})", data));
  EXPECT_THROW(ints.values<float>("i"), FormatError);
  EXPECT_THROW(SafeTensors::load("/nonexistent/file.safetensors"), FormatError);
}

}  // namespace
}  // namespace test_safetensors
