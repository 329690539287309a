// Parity with Hugging Face PEFT 0.21.0: every number here was computed by PEFT's own lora.Linear
// (tests/fixtures/peft, copied from shared/fixtures/peft; its README says what each tensor is).
// PEFT stores one row per sample (x: n x in); this library uses one column per sample, so every
// batch tensor is transposed on the way in.
#include "test_helpers.hpp"

#include <lora/io/safetensors.hpp>
#include <lora/lora.hpp>

#include <nlohmann/json.hpp>

#include <fstream>
#include <string>

namespace test_peft_parity {
namespace {

using lora::test::fixture_path;

struct Case {
  std::string name;
  double tolerance;
};

template <typename T>
void check_case(const std::string& name, double tol) {
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;
  const auto st = lora::io::SafeTensors::load(fixture_path("peft/" + name + ".safetensors"));
  std::ifstream meta_file(fixture_path("peft/" + name + ".json"));
  const auto meta = nlohmann::json::parse(meta_file);

  lora::LoRAConfig cfg;
  cfg.rank = meta["r"].get<int>();
  cfg.alpha = meta["lora_alpha"].get<double>();
  cfg.use_rslora = meta["use_rslora"].get<bool>();

  const Matrix W0 = st.matrix<T>("W0");
  const Matrix X = st.matrix<T>("x").transpose();  // k x n
  const Matrix G = st.matrix<T>("G").transpose();  // d x n
  lora::LoRALinear<T> layer(lora::DenseFrozenWeight<T>(W0, lora::MergeMode::ExactRestore),
                            meta["bias"].get<bool>() ? st.vector<T>("bias") : Vector(), cfg);
  EXPECT_NEAR(layer.scaling(), meta["scaling"].get<double>(),
              1e-15 * meta["scaling"].get<double>());
  layer.set_adapter_weights(st.matrix<T>("A"), st.matrix<T>("B"));

  EXPECT_MATRIX_NEAR(layer.forward(X), st.matrix<T>("y").transpose(), tol);
  const Matrix dX = layer.backward(X, G);
  EXPECT_MATRIX_NEAR(dX, st.matrix<T>("dx").transpose(), tol);
  EXPECT_MATRIX_NEAR(layer.grad_A(), st.matrix<T>("dA"), tol);
  EXPECT_MATRIX_NEAR(layer.grad_B(), st.matrix<T>("dB"), tol);

  layer.merge();
  EXPECT_MATRIX_NEAR(layer.weight(), st.matrix<T>("W_merged"), tol);
  EXPECT_MATRIX_NEAR(layer.forward(X), st.matrix<T>("y_merged").transpose(), tol);

  // PEFT's unmerge subtracts the delta again and can land an ulp off W0; ExactRestore gives W0
  // back bit for bit.
  layer.unmerge();
  EXPECT_TRUE((layer.weight().array() == W0.array()).all());
  EXPECT_MATRIX_NEAR(st.matrix<T>("W_unmerged"), W0, 32 * Eigen::NumTraits<T>::epsilon());

  // The in-place mode (PEFT's way) stays within its documented bound for one cycle:
  // |W - W0| <= 2u (|W0| + |s B A|) elementwise.
  lora::LoRALinear<T> in_place(W0, cfg);  // the dense storage's default: MergeMode::InPlace
  in_place.set_adapter_weights(st.matrix<T>("A"), st.matrix<T>("B"));
  const Matrix delta = in_place.delta_weight();
  in_place.merge();
  EXPECT_MATRIX_NEAR(in_place.weight(), st.matrix<T>("W_merged"), tol);
  in_place.unmerge();
  const T u = Eigen::NumTraits<T>::epsilon() / 2;
  const Matrix bound = 2 * u * (W0.cwiseAbs() + delta.cwiseAbs());
  EXPECT_TRUE(((in_place.weight() - W0).cwiseAbs().array() <= bound.array()).all());
  (void)Vector();
}

void PrintTo(const Case& c, std::ostream* os) {
  *os << c.name;
}

class PeftParity : public ::testing::TestWithParam<Case> {};

TEST_P(PeftParity, ForwardBackwardMergeMatchPeft) {
  const Case& c = GetParam();
  if (c.name.rfind("f64", 0) == 0) {
    check_case<double>(c.name, c.tolerance);
  } else {
    check_case<float>(c.name, c.tolerance);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, PeftParity,
                         ::testing::Values(Case{"f64_basic", 1e-12}, Case{"f64_rslora", 1e-12},
                                           Case{"f64_bias", 1e-12}, Case{"f64_rank1", 1e-12},
                                           Case{"f32_wide", 1e-5}, Case{"f32_r16", 1e-5}),
                         [](const auto& info) { return info.param.name; });

// The fixtures' A_init are PEFT's own draws of A ~ N(0, (1/r)^2); this library's draw (another
// generator) must have the same distribution. Pool PEFT's and ours and compare moments.
TEST(PeftInit, GaussianInitHasPeftsStandardDeviation) {
  const auto st = lora::io::SafeTensors::load(fixture_path("peft/f32_r16.safetensors"));
  const Eigen::MatrixXd peft_A = st.matrix<double>("A_init");
  const int r = static_cast<int>(peft_A.rows());
  const double peft_std = std::sqrt(peft_A.array().square().mean());
  EXPECT_NEAR(peft_std, 1.0 / r, 0.1 / r);  // PEFT's own sample agrees with 1/r...

  lora::LoRAConfig cfg;
  cfg.rank = r;
  lora::LoRALinear<double> layer(Eigen::MatrixXd::Zero(64, 64), cfg);
  const double ours = std::sqrt(layer.A().array().square().mean());
  EXPECT_NEAR(ours, peft_std, 0.15 / r);  // ...and so does ours.
  EXPECT_TRUE((st.matrix<double>("B_init").array() == 0).all());
}

}  // namespace
}  // namespace test_peft_parity
