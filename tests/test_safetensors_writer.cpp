// The safetensors writer: byte-identical to the files PyTorch/PEFT wrote, bit-exact F32/F64 round
// trips, correctly rounded F16/BF16 (checked against hand-computed values and against the two
// neighbouring representable values), and atomic replacement that survives injected failures.
#include "test_helpers.hpp"

#include <lora/io/atomic_file.hpp>
#include <lora/io/safetensors.hpp>
#include <lora/io/safetensors_writer.hpp>

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace test_safetensors_writer {
namespace {

using lora::io::DType;
using lora::io::SafeTensors;
using lora::io::SafeTensorsWriter;
using lora::io::WriteError;
using lora::io::detail::WriteStep;

std::string tmp_dir(const std::string& name) {
  const std::string dir = std::string(LORA_TEST_TMP_DIR) + "/" + name;
  ::mkdir(dir.c_str(), 0777);
  return dir;
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> out;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (const dirent* e = ::readdir(d)) {
      const std::string n = e->d_name;
      if (n != "." && n != "..") out.push_back(n);
    }
    ::closedir(d);
  }
  return out;
}

/// Rewrites every tensor of a fixture with the writer; the bytes must equal the original file.
void expect_rewrite_identical(const std::string& relative) {
  const std::string path = lora::test::fixture_path(relative);
  const SafeTensors st = SafeTensors::load(path);
  SafeTensorsWriter w;
  for (const auto& [k, v] : st.metadata()) w.set_metadata(k, v);
  for (const auto& name : st.names()) {
    const auto& info = st.info(name);
    ASSERT_TRUE(info.dtype == DType::F32 || info.dtype == DType::F64) << name;
    if (info.shape.size() == 2)
      w.add(name, st.matrix<double>(name), info.dtype);
    else
      w.add_vector(name, st.vector<double>(name), info.dtype);
  }
  const auto original = lora::test::read_bytes(path);
  const auto written = w.serialize();
  ASSERT_EQ(written.size(), original.size()) << relative;
  EXPECT_TRUE(written == original) << relative << ": same size, different bytes";
}

TEST(SafeTensorsWrite, ReproducesPeftFilesByteForByte) {
  expect_rewrite_identical("peft/llama_adapter/adapter_model.safetensors");
  expect_rewrite_identical("peft/llama_pattern_adapter/adapter_model.safetensors");
  expect_rewrite_identical("peft/gpt2_adapter/adapter_model.safetensors");
  expect_rewrite_identical("peft/gpt2_adapter_modules.safetensors");
  expect_rewrite_identical("peft/f64_bias.safetensors");
}

TEST(SafeTensorsWrite, HeaderIsPaddedWithSpacesToEightBytesAndSortedByDtypeThenName) {
  SafeTensorsWriter w;
  w.add("b", Eigen::MatrixXf::Ones(1, 1), DType::F32);
  w.add("a", Eigen::MatrixXf::Ones(1, 1), DType::BF16);
  w.add("c", Eigen::MatrixXd::Ones(1, 1), DType::F64);
  const auto bytes = w.serialize();
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[static_cast<std::size_t>(i)];
  EXPECT_EQ(n % 8, 0u);
  const std::string header(bytes.begin() + 8, bytes.begin() + 8 + static_cast<long>(n));
  // F64 first, then F32, then BF16 (the Python library: dtype descending, then name).
  EXPECT_EQ(header.substr(0, header.find_last_not_of(' ') + 1),
            R"({"c":{"dtype":"F64","shape":[1,1],"data_offsets":[0,8]},)"
            R"("b":{"dtype":"F32","shape":[1,1],"data_offsets":[8,12]},)"
            R"("a":{"dtype":"BF16","shape":[1,1],"data_offsets":[12,14]}})");
  EXPECT_EQ(bytes.size(), 8 + n + 14);
}

TEST(SafeTensorsWrite, F32AndF64RoundTripBitExactRowMajor) {
  Eigen::MatrixXd D = Eigen::MatrixXd::Random(5, 7);
  D(0, 0) = -0.0;
  D(1, 2) = std::numeric_limits<double>::denorm_min();
  D(2, 3) = std::numeric_limits<double>::infinity();
  D(4, 6) = std::numeric_limits<double>::max();
  Eigen::MatrixXf F = Eigen::MatrixXf::Random(3, 4);
  F(0, 1) = std::numeric_limits<float>::denorm_min();
  F(2, 0) = -std::numeric_limits<float>::infinity();
  SafeTensorsWriter w;
  w.add("d", D, DType::F64);
  w.add("f", F, DType::F32);
  w.add_vector("v", Eigen::VectorXf::LinSpaced(4, 1, 4), DType::F32);
  const SafeTensors st = SafeTensors::parse(w.serialize());
  EXPECT_EQ(st.info("d").shape, (std::vector<std::int64_t>{5, 7}));
  const Eigen::MatrixXd D2 = st.matrix<double>("d");
  const Eigen::MatrixXf F2 = st.matrix<float>("f");
  EXPECT_EQ(std::memcmp(D2.data(), D.data(), sizeof(double) * D.size()), 0);
  EXPECT_EQ(std::memcmp(F2.data(), F.data(), sizeof(float) * F.size()), 0);
  EXPECT_EQ(st.values<double>("d")[1], D(0, 1));  // row-major: second value is (0, 1)
  EXPECT_EQ(st.vector<float>("v")(3), 4.0f);
  EXPECT_EQ(st.info("v").shape, (std::vector<std::int64_t>{4}));
}

TEST(SafeTensorsWrite, HalfPrecisionRoundsToNearestEvenFromDoubleWithoutDoubleRounding) {
  const double u16 = std::ldexp(1.0, -10), u_bf = std::ldexp(1.0, -7);
  // value -> expected bits, computed by hand.
  const std::vector<std::pair<double, std::uint16_t>> f16 = {
      {1.0 + u16 / 2, 0x3C00},                                // tie -> even (1.0)
      {1.0 + 3 * u16 / 2, 0x3C02},                            // tie -> even (1 + 2u)
      {1.0 + u16 / 2 + std::ldexp(1.0, -40), 0x3C01},         // just above the tie: up
      {1.0 + u16 / 2 - std::ldexp(1.0, -40), 0x3C00},         // just below: down
      {65520.0, 0x7C00},                                      // rounds to infinity
      {65519.99, 0x7BFF},                                     // largest finite
      {std::ldexp(1.0, -25) + std::ldexp(1.0, -60), 0x0001},  // above half the smallest subnormal
      {-std::ldexp(1.0, -25), 0x8000},                        // tie at the smallest subnormal -> -0
  };
  const std::vector<std::pair<double, std::uint16_t>> bf16 = {
      {1.0 + u_bf / 2, 0x3F80},
      {1.0 + u_bf / 2 + std::ldexp(1.0, -40), 0x3F81},  // float rounding would give the tie
      {1.0 + 3 * u_bf / 2, 0x3F82},
      {-2.0 - u_bf, 0xC000},
  };
  for (const auto& [v, bits] : f16) {
    EXPECT_EQ(lora::io::double_to_f16(v), bits) << "f16 of " << v;
    if ((bits & 0x7C00) == 0x7C00) {  // the writer refuses a finite value that would become inf
      SafeTensorsWriter w;
      EXPECT_THROW(w.add("x", Eigen::MatrixXd::Constant(1, 1, v), DType::F16), std::domain_error);
      continue;
    }
    SafeTensorsWriter w;
    w.add("x", Eigen::MatrixXd::Constant(1, 1, v), DType::F16);
    const auto bytes = w.serialize();
    const std::uint16_t got =
        static_cast<std::uint16_t>(bytes[bytes.size() - 2] | (bytes[bytes.size() - 1] << 8));
    EXPECT_EQ(got, bits) << "f16 of " << v;
  }
  for (const auto& [v, bits] : bf16) {
    EXPECT_EQ(lora::io::double_to_bf16(v), bits) << "bf16 of " << v;
    SafeTensorsWriter w;
    w.add("x", Eigen::MatrixXd::Constant(1, 1, v), DType::BF16);
    const SafeTensors st = SafeTensors::parse(w.serialize());
    EXPECT_EQ(st.values<double>("x")[0], static_cast<double>(lora::io::bf16_to_float(bits)));
  }
}

TEST(SafeTensorsWrite, HalfPrecisionIsTheNearestOfItsNeighbours) {
  // For random doubles: the stored value is at least as close as both adjacent halves, and on a
  // tie its last bit is even.
  std::mt19937_64 gen(7);
  std::uniform_real_distribution<double> mant(-1.0, 1.0);
  std::uniform_int_distribution<int> expo(-20, 15);
  for (int i = 0; i < 20000; ++i) {
    const double v = std::ldexp(mant(gen), expo(gen));
    for (const bool bf : {false, true}) {
      const std::uint16_t h = bf ? lora::io::double_to_bf16(v) : lora::io::double_to_f16(v);
      auto val = [bf](std::uint16_t b) {
        return static_cast<double>(bf ? lora::io::bf16_to_float(b) : lora::io::f16_to_float(b));
      };
      const double got = std::fabs(val(h) - v);
      for (const int step : {-1, 1}) {
        const std::uint16_t nb = static_cast<std::uint16_t>(h + step);
        if ((nb & 0x7fff) == 0x7fff || std::isnan(val(nb))) continue;
        const double other = std::fabs(val(nb) - v);
        ASSERT_LE(got, other) << (bf ? "bf16" : "f16") << " of " << v;
        if (got == other) {
          ASSERT_EQ(h & 1, 0) << "tie not to even for " << v;
        }
      }
    }
  }
}

TEST(SafeTensorsWrite, RejectsBadTensors) {
  SafeTensorsWriter w;
  w.add("a", Eigen::MatrixXf::Ones(2, 2), DType::F32);
  EXPECT_THROW(w.add("a", Eigen::MatrixXf::Ones(2, 2), DType::F32), std::invalid_argument);
  EXPECT_THROW(w.add("", Eigen::MatrixXf::Ones(2, 2), DType::F32), std::invalid_argument);
  EXPECT_THROW(w.add("__metadata__", Eigen::MatrixXf::Ones(1, 1), DType::F32),
               std::invalid_argument);
  EXPECT_THROW(w.add("i", Eigen::MatrixXf::Ones(1, 1), DType::I32), std::invalid_argument);
  EXPECT_THROW(w.add_vector("m", Eigen::MatrixXf::Ones(2, 2), DType::F32), std::invalid_argument);
}

TEST(AtomicFile, InjectedFailureAtEveryStepLeavesThePreviousFileAndNoTemporary) {
  const std::string dir = tmp_dir("atomic_steps");
  const std::string path = dir + "/file.bin";
  lora::io::write_file_atomically(path, std::string("previous contents"));
  const auto before = lora::test::read_bytes(path);
  const std::string big(1 << 20, 'x');
  for (const WriteStep step :
       {WriteStep::Open, WriteStep::Write, WriteStep::Sync, WriteStep::Rename}) {
    lora::io::detail::injected_write_failure = step;
    EXPECT_THROW(lora::io::write_file_atomically(path, big), WriteError);
    lora::io::detail::injected_write_failure = WriteStep::None;
    EXPECT_EQ(lora::test::read_bytes(path), before) << "step " << static_cast<int>(step);
    EXPECT_EQ(list_dir(dir), std::vector<std::string>{"file.bin"}) << "a temporary file was left";
  }
  lora::io::write_file_atomically(path, std::string("new"));
  EXPECT_EQ(lora::test::read_bytes(path), (std::vector<std::uint8_t>{'n', 'e', 'w'}));
}

TEST(AtomicFile, MissingOrUnwritableFolderThrowsAndLeavesTheFile) {
  EXPECT_THROW(lora::io::write_file_atomically(std::string(LORA_TEST_TMP_DIR) + "/no/such/x", "a"),
               WriteError);
  // A target that is a folder cannot be replaced by a file: the rename fails, the folder stays.
  const std::string folder = tmp_dir("atomic_target_is_folder");
  tmp_dir("atomic_target_is_folder/inside");
  EXPECT_THROW(lora::io::write_file_atomically(folder, std::string("x")), WriteError);
  EXPECT_EQ(list_dir(folder), std::vector<std::string>{"inside"});
  for (const auto& name : list_dir(LORA_TEST_TMP_DIR))
    EXPECT_EQ(name.find("atomic_target_is_folder.tmp"), std::string::npos) << name;
  if (::geteuid() == 0) GTEST_SKIP() << "root ignores folder permissions";
  const std::string dir = tmp_dir("atomic_readonly");
  const std::string path = dir + "/file.bin";
  lora::io::write_file_atomically(path, std::string("previous"));
  ::chmod(dir.c_str(), 0555);
  EXPECT_THROW(lora::io::write_file_atomically(path, std::string("new")), WriteError);
  ::chmod(dir.c_str(), 0755);
  EXPECT_EQ(lora::test::read_bytes(path),
            (std::vector<std::uint8_t>{'p', 'r', 'e', 'v', 'i', 'o', 'u', 's'}));
}

TEST(AtomicFile, WriterSaveReplacesAnExistingFile) {
  const std::string path = tmp_dir("writer_save") + "/t.safetensors";
  SafeTensorsWriter w1, w2;
  w1.add("x", Eigen::MatrixXf::Ones(2, 3), DType::F32);
  w2.add("y", Eigen::MatrixXd::Zero(1, 1), DType::F64);
  w1.save(path);
  w2.save(path);
  const SafeTensors st = SafeTensors::load(path);
  EXPECT_EQ(st.names(), std::vector<std::string>{"y"});
}

}  // namespace
}  // namespace test_safetensors_writer
