// Replays every input the fuzzers have ever failed on (fuzz/regressions/) and every seed, through
// the same harness the fuzz target runs, and pins the hostile inputs found while fuzzing that are
// too large to keep as files. Under the `asan` preset this is the fuzzer's check, without
// libFuzzer.
#include "peft_adapter_harness.hpp"
#include "safetensors_harness.hpp"
#include "test_helpers.hpp"

#include <filesystem>
#include <string>
#include <vector>

namespace test_fuzz_regressions {
namespace {

namespace fs = std::filesystem;
using lora::io::FormatError;
using lora::io::SafeTensors;

std::vector<fs::path> files_in(const fs::path& dir, const std::string& extension = "") {
  std::vector<fs::path> out;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file() && (extension.empty() || e.path().extension() == extension))
      out.push_back(e.path());
  return out;
}

/// Accepted, or refused with a FormatError: anything else (another exception) fails the test;
/// a crash or a sanitizer report fails the run.
void expect_clean(const fs::path& file) {
  const std::vector<std::uint8_t> bytes = lora::test::read_bytes(file.string());
  try {
    lora::fuzz::exercise_safetensors(bytes.data(), bytes.size());
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("safetensors"), std::string::npos) << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << file << ": " << e.what() << " is not a lora::io::FormatError";
  }
}

std::vector<std::uint8_t> with_header(const std::string& header) {
  std::vector<std::uint8_t> out;
  out.reserve(8 + header.size());
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<std::uint8_t>(header.size() >> (8 * i)));
  for (char c : header) out.push_back(static_cast<std::uint8_t>(c));
  return out;
}

TEST(FuzzRegressions, EverySafetensorsRegressionIsAcceptedOrAFormatError) {
  const auto files = files_in(fs::path(LORA_FUZZ_DIR) / "regressions" / "safetensors");
  ASSERT_FALSE(files.empty());
  for (const auto& f : files) {
    SCOPED_TRACE(f.string());
    expect_clean(f);
  }
}

TEST(FuzzRegressions, EverySeedIsAValidFile) {
  auto files = files_in(fs::path(LORA_FUZZ_DIR) / "seeds" / "safetensors", ".safetensors");
  for (const auto& f : files_in(LORA_FIXTURE_DIR, ".safetensors")) files.push_back(f);
  ASSERT_GE(files.size(), 10u);
  for (const auto& f : files) {
    SCOPED_TRACE(f.string());
    const auto bytes = lora::test::read_bytes(f.string());
    EXPECT_NO_THROW(lora::fuzz::exercise_safetensors(bytes.data(), bytes.size()));
  }
}

/// The PEFT harness's scratch directory for the two files it writes: one per test, because ctest
/// runs the tests of this binary in parallel processes.
std::string peft_scratch() {
  const std::string dir = std::string(LORA_TEST_TMP_DIR) + "/fuzz_regressions_peft_" +
                          ::testing::UnitTest::GetInstance()->current_test_info()->name();
  fs::create_directories(dir);
  return dir;
}

TEST(FuzzRegressions, EveryPeftAdapterRegressionIsAcceptedOrAFormatError) {
  const fs::path dir = fs::path(LORA_FUZZ_DIR) / "regressions" / "peft_adapter";
  if (!fs::exists(dir)) GTEST_SKIP() << "no PEFT adapter input has failed yet";
  for (const auto& f : files_in(dir)) {
    SCOPED_TRACE(f.string());
    const auto bytes = lora::test::read_bytes(f.string());
    try {
      lora::fuzz::exercise_peft_adapter(bytes.data(), bytes.size(), peft_scratch());
    } catch (const FormatError&) {
    } catch (const std::exception& e) {
      ADD_FAILURE() << e.what() << " is not a lora::io::FormatError";
    }
  }
}

// Found while fuzzing the PEFT loader (hand-made inputs through the harness, under ASan), both
// stack overflows: json::dump() of a 30,000-deep "r" in an error message (configs deeper than 64
// levels are now refused while parsing), and std::regex_match recursing once per character of a
// 40,000- character module path (paths are now limited to 1,024 characters; at the limit they still
// load).
TEST(FuzzRegressions, HostilePeftConfigsAreRefusedAndPathsAtTheLimitLoad) {
  const fs::path dir = fs::path(LORA_FUZZ_DIR) / "regressions" / "peft_adapter";
  auto run = [&](const char* name) {
    const auto bytes = lora::test::read_bytes((dir / name).string());
    lora::fuzz::exercise_peft_adapter(bytes.data(), bytes.size(), peft_scratch());
  };
  EXPECT_THROW(run("config-nested-30000-deep.bin"), FormatError);
  EXPECT_THROW(run("module-path-40000-chars-regex-recursion.bin"), FormatError);
  EXPECT_NO_THROW(run("module-path-at-1024-limit.bin"));
  EXPECT_NO_THROW(run("module-path-at-1024-limit-dot-star.bin"));
}

// Hostile files written by fuzz/regressions/make_regressions.py: each used to crash (a regex of
// 20,000 nested groups), to load a silent infinity or NaN, or to be read ambiguously (a key twice,
// a NUL byte that hid the rest of the header, bytes no tensor claims). Each is now refused with a
// FormatError that says why.
TEST(FuzzRegressions, HostileFilesAreRefusedSayingWhy) {
  const fs::path peft = fs::path(LORA_FUZZ_DIR) / "regressions" / "peft_adapter";
  const std::vector<std::pair<const char*, const char*>> adapters = {
      {"target-modules-regex-20000-nested-groups.bin", "limited to 1024 characters"},
      {"peft-type-null.bin", "peft_type must be a string"},
      {"r-null.bin", "r must be a positive integer, got null"},
      {"lora-alpha-1e40-for-float.bin", "lora_alpha = 1e+40"},
      {"alpha-pattern-1e40-for-float.bin", "alpha_pattern[\"q\"] = 1e+40"},
      {"f64-1e300-in-lora-A-for-float.bin", "beyond the range of float"},
      {"nan-in-lora-B.bin", "holds nan at [1, 0]"},
      {"config-nul-then-garbage.bin", "NUL byte"},
      {"weights-duplicate-key.bin", "twice in one object"},
  };
  for (const auto& [name, part] : adapters) {
    SCOPED_TRACE(name);
    const auto bytes = lora::test::read_bytes((peft / name).string());
    ASSERT_FALSE(bytes.empty());
    try {
      lora::fuzz::exercise_peft_adapter(bytes.data(), bytes.size(), peft_scratch());
      ADD_FAILURE() << "accepted";
    } catch (const FormatError& e) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  }
  const fs::path st = fs::path(LORA_FUZZ_DIR) / "regressions" / "safetensors";
  const std::vector<std::pair<const char*, const char*>> files = {
      {"duplicate-key-last-would-win.safetensors", "key \"w\" twice"},
      {"header-padded-with-nul-then-garbage.safetensors", "NUL byte"},
      {"gap-between-tensors.safetensors", "belong to no tensor"},
      {"bytes-after-the-last-tensor.safetensors", "after the last tensor"},
      {"header-nested-100-deep.safetensors", "nests deeper than 64 levels"},
  };
  for (const auto& [name, part] : files) {
    SCOPED_TRACE(name);
    const auto bytes = lora::test::read_bytes((st / name).string());
    ASSERT_FALSE(bytes.empty());
    try {
      lora::fuzz::exercise_safetensors(bytes.data(), bytes.size());
      ADD_FAILURE() << "accepted";
    } catch (const FormatError& e) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  }
}

TEST(FuzzRegressions, EveryPeftAdapterSeedIsAValidAdapter) {
  const auto files = files_in(fs::path(LORA_FUZZ_DIR) / "seeds" / "peft_adapter", ".bin");
  ASSERT_GE(files.size(), 6u);
  for (const auto& f : files) {
    SCOPED_TRACE(f.string());
    const auto bytes = lora::test::read_bytes(f.string());
    EXPECT_NO_THROW(lora::fuzz::exercise_peft_adapter(bytes.data(), bytes.size(), peft_scratch()));
  }
}

// Found while writing the fuzz harness (a hand-made input run through it under UBSan; 10 minutes of
// libFuzzer had not hit it): TensorInfo::numel() multiplied [2^62, 3, 0] in int64
// (signed overflow, undefined) before reaching the zero. A zero dimension means no elements.
TEST(FuzzRegressions, ZeroDimensionBesideHugeOnesHasNoElements) {
  const auto st = SafeTensors::parse(with_header(
      R"({"t":{"dtype":"F32","shape":[4611686018427387904,3,0],"data_offsets":[0,0]}})"));
  EXPECT_EQ(st.info("t").numel(), 0);
  EXPECT_TRUE(st.values<float>("t").empty());
  lora::io::TensorInfo too_big;
  too_big.shape = {4611686018427387904, 3};
  EXPECT_THROW(too_big.numel(), FormatError);
}

// Found the same way, under ASan: an error message dumped the offending JSON value, and
// nlohmann::json::dump() recurses once per nesting level, so `"data_offsets": [[[[...]]]]` (well
// within the 100 MB header limit) overflowed the stack. The reader's own parser is iterative; the
// messages now describe such values by type and size.
TEST(FuzzRegressions, DeeplyNestedHeaderValuesAreAFormatErrorNotAStackOverflow) {
  const std::size_t depth = 1'000'000;  // 2 MB of brackets
  for (const char* field : {"data_offsets", "shape"}) {
    std::string header = R"({"t":{"dtype":"F32",)";
    header += field == std::string("shape")
                  ? R"("data_offsets":[0,4],"shape":[4294967296,4294967296,)"
                  : R"("shape":[1],"data_offsets":)";
    header += std::string(depth, '[') + std::string(depth, ']');
    header += field == std::string("shape") ? "]}}" : "}}";
    try {
      SafeTensors::parse(with_header(header));
      ADD_FAILURE() << "a nested " << field << " was accepted";
    } catch (const FormatError& e) {
      EXPECT_LT(std::string(e.what()).size(), 300u) << e.what();
    }
  }
}

}  // namespace
}  // namespace test_fuzz_regressions
