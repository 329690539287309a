// PiSSA, OLoRA, LoftQ and orthogonal inits, and the conversion of a PiSSA adapter to a plain one,
// against PEFT's formulas replayed in PyTorch (tests/fixtures/peft-inits, copied from
// shared/fixtures/peft-inits; its README says what each tensor is). What does not depend on the
// SVD's or QR's sign conventions (B A, W_res, outputs) is compared to 1e-12 (f64) / 1e-5 (f32);
// A and B up to the sign of each rank-one component.
#include "test_helpers.hpp"

#include <gtest/gtest.h>
#include <lora/base_init.hpp>
#include <lora/lora.hpp>

#include <nlohmann/json.hpp>

#include <Eigen/Core>

#include <cmath>
#include <fstream>
#include <string>

namespace test_inits {

using lora::Bf16FrozenWeight;
using lora::Init;
using lora::LoRAConfig;
using lora::LoRALinear;
using lora::MultiLoRALinear;
using lora::Nf4FrozenWeight;
using lora::test::fixture_path;

struct Fixture {
  lora::io::SafeTensors st;
  nlohmann::json meta;
};

Fixture load(const std::string& name) {
  Fixture f{lora::io::SafeTensors::load(fixture_path("peft-inits/" + name + ".safetensors")), {}};
  std::ifstream in(fixture_path("peft-inits/" + name + ".json"));
  f.meta = nlohmann::json::parse(in);
  return f;
}

LoRAConfig config_of(const Fixture& f, Init init) {
  LoRAConfig cfg;
  cfg.rank = f.meta["r"].get<int>();
  cfg.alpha = f.meta["lora_alpha"].get<double>();
  cfg.use_rslora = f.meta.value("use_rslora", false);
  cfg.init = init;
  return cfg;
}

/// A and B equal the reference up to the sign of each rank-one component (row i of A with column
/// i of B).
template <typename M, typename R>
void expect_factors_up_to_sign(const M& A, const M& B, const R& A_ref, const R& B_ref, double tol) {
  ASSERT_EQ(A.rows(), A_ref.rows());
  ASSERT_EQ(B.cols(), B_ref.cols());
  M As = A, Bs = B;
  for (Eigen::Index i = 0; i < A.rows(); ++i) {
    if (static_cast<double>(As.row(i).dot(A_ref.row(i).template cast<typename M::Scalar>())) < 0) {
      As.row(i) *= -1;
      Bs.col(i) *= -1;
    }
  }
  EXPECT_MATRIX_NEAR(As, A_ref, tol);
  EXPECT_MATRIX_NEAR(Bs, B_ref, tol);
}

/// Elements of two dequantized 4-bit weights that differ by more than float rounding of their
/// block scales (1e-5 of the largest element): codes that differ.
long differing_codes(const Eigen::MatrixXf& a, const Eigen::MatrixXf& b) {
  const float tol = 1e-5f * b.cwiseAbs().maxCoeff();
  return static_cast<long>(((a - b).array().abs() > tol).count());
}

/// The initialised layer: its factors, residual base and output against the fixture.
template <typename Layer, typename T>
void check_residual_init(const Layer& layer, const lora::LoRAAdapter<T>& a, const Fixture& f,
                         double tol) {
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  const Matrix A_ref = f.st.matrix<T>("A"), B_ref = f.st.matrix<T>("B");
  EXPECT_FALSE(a.init_pending());
  EXPECT_MATRIX_NEAR(Matrix(a.B() * a.A()), Matrix(B_ref * A_ref), tol);
  EXPECT_MATRIX_NEAR(layer.weight(), f.st.matrix<T>("W_res"), tol);
  const Matrix X = f.st.matrix<T>("x").transpose();
  EXPECT_MATRIX_NEAR(layer.forward(X), f.st.matrix<T>("y").transpose(), tol);
  expect_factors_up_to_sign(a.A(), a.B(), A_ref, B_ref, 100 * tol);
  EXPECT_MATRIX_NEAR(a.initial_A(), a.A(), 0.0);
}

template <typename T>
void check_dense_case(const std::string& name, Init init, double tol) {
  SCOPED_TRACE(name);
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  const Fixture f = load(name);
  const LoRAConfig cfg = config_of(f, init);
  const Matrix W0 = f.st.matrix<T>("W0");
  LoRALinear<T> layer(W0, cfg);
  EXPECT_NEAR(layer.scaling(), f.meta["scaling"].get<double>(), 1e-6);
  check_residual_init(layer, layer.adapter(), f, tol);
  // The residual is a real base: merge folds the adapter into it, unmerge gives it back.
  layer.merge();
  EXPECT_MATRIX_NEAR(layer.weight(), W0, tol);
  layer.unmerge();
  EXPECT_MATRIX_NEAR(layer.weight(), f.st.matrix<T>("W_res"), tol);

  // The other face: the init applies when the adapter joins a MultiLoRALinear.
  MultiLoRALinear<T> multi(W0);
  auto& a = multi.add_adapter("init", cfg);
  multi.set_active("init");
  check_residual_init(multi, a, f, tol);
}

TEST(Inits, PissaMatchesPeftF64) {
  check_dense_case<double>("pissa_f64", Init::PiSSA, 1e-12);
  check_dense_case<double>("pissa_f64_wide", Init::PiSSA, 1e-12);
}

TEST(Inits, PissaMatchesPeftF32Rslora) {
  check_dense_case<float>("pissa_f32_rslora", Init::PiSSA, 1e-5);
}

TEST(Inits, OloraMatchesPeft) {
  check_dense_case<double>("olora_f64", Init::OLoRA, 1e-12);
  check_dense_case<double>("olora_f64_wide", Init::OLoRA, 1e-12);
}

// QPiSSA / QOLoRA: a bf16, NF4 or llama.cpp block storage holds the residual as it holds any W0,
// and the init factors the full-precision W0 given to the layer.
TEST(Inits, ResidualBasesOnBf16Nf4AndGgml) {
  for (const auto& [name, init] :
       {std::pair<std::string, Init>{"pissa_f64", Init::PiSSA}, {"olora_f64", Init::OLoRA}}) {
    SCOPED_TRACE(name);
    const Fixture f = load(name);
    const LoRAConfig cfg = config_of(f, init);
    const Eigen::MatrixXf W0 = f.st.matrix<float>("W0");
    const Eigen::MatrixXf W_res = f.st.matrix<float>("W_res");
    const Eigen::MatrixXf BA = f.st.matrix<float>("B") * f.st.matrix<float>("A");

    LoRALinear<float, Bf16FrozenWeight> bf16(W0, cfg);
    EXPECT_MATRIX_NEAR(Eigen::MatrixXf(bf16.B() * bf16.A()), BA, 1e-5);
    // round_bf16 of our f32 residual against round_bf16 of PEFT's: equal but where the two f32
    // residuals straddle a rounding boundary (one bf16 step, 2^-8 relative).
    EXPECT_MATRIX_NEAR(bf16.weight(), Bf16FrozenWeight(W_res).weight(), 1.0 / 128);
    MultiLoRALinear<float, Bf16FrozenWeight> bf16_multi{Bf16FrozenWeight(W0)};
    bf16_multi.add_adapter("a", cfg, W0);
    EXPECT_MATRIX_NEAR(bf16_multi.weight(), bf16.weight(), 0.0);

    lora::Nf4Options opts;
    opts.double_quantization = false;
    LoRALinear<float, Nf4FrozenWeight> nf4(Nf4FrozenWeight(W0, opts), {}, cfg, W0);
    EXPECT_MATRIX_NEAR(Eigen::MatrixXf(nf4.B() * nf4.A()), BA, 1e-5);
    const Eigen::MatrixXf q_ref = Nf4FrozenWeight(W_res, opts).weight();
    // The block scales (absmax of the residual) agree to float rounding; a code may flip where
    // PEFT's residual and ours sit on either side of a threshold.
    EXPECT_LE(differing_codes(nf4.weight(), q_ref), 2) << "codes differing from nf4(W_res)";
    MultiLoRALinear<float, Nf4FrozenWeight> nf4_multi{Nf4FrozenWeight(W0, opts)};
    nf4_multi.add_adapter("a", cfg, W0);
    EXPECT_MATRIX_NEAR(nf4_multi.weight(), nf4.weight(), 0.0);
    EXPECT_MATRIX_NEAR(nf4_multi.adapter("a").A(), nf4.A(), 0.0);

    // llama.cpp's Q8_0 blocks: the residual is quantized by llama.cpp's quantizer, as any W0.
    using lora::GgmlFrozenWeight;
    const auto q8_0 = lora::io::GgmlType::Q8_0;
    LoRALinear<float, GgmlFrozenWeight> ggml(GgmlFrozenWeight::quantize(W0, q8_0), {}, cfg, W0);
    EXPECT_MATRIX_NEAR(Eigen::MatrixXf(ggml.B() * ggml.A()), BA, 1e-5);
    // One Q8_0 step (a block's absmax / 127) where the two f32 residuals round apart.
    EXPECT_MATRIX_NEAR(ggml.weight(), GgmlFrozenWeight::quantize(W_res, q8_0).weight(),
                       W_res.cwiseAbs().maxCoeff() / 127 + 1e-6);
    MultiLoRALinear<float, GgmlFrozenWeight> ggml_multi{GgmlFrozenWeight::quantize(W0, q8_0)};
    ggml_multi.add_adapter("a", cfg, W0);
    EXPECT_MATRIX_NEAR(ggml_multi.weight(), ggml.weight(), 0.0);
  }
}

// pissa_niter_N: the randomized range finder recovers the exact factors when the spectrum decays
// (here a rank-12 weight plus noise 1e-9), and it is seeded: the same seed, the same factors.
TEST(Inits, RandomizedPissaIsSeededAndAccurate) {
  const Eigen::Index d = 60, k = 45;
  lora::Rng rng(5);
  Eigen::MatrixXd L(d, 12), R(12, k), N(d, k);
  lora::fill_normal(L, rng, 0.0, 1.0);
  lora::fill_normal(R, rng, 0.0, 1.0);
  lora::fill_normal(N, rng, 0.0, 1e-9);
  const Eigen::MatrixXd W = L * R + N;
  LoRAConfig cfg;
  cfg.rank = 12;
  cfg.alpha = 24;
  cfg.init = Init::PiSSA;
  LoRALinear<double> exact(W, cfg);
  cfg.svd_iterations = 4;
  cfg.seed = 7;
  LoRALinear<double> fast(W, cfg), again(W, cfg);
  EXPECT_MATRIX_NEAR(Eigen::MatrixXd(fast.B() * fast.A()), Eigen::MatrixXd(exact.B() * exact.A()),
                     1e-7);
  EXPECT_MATRIX_NEAR(fast.A(), again.A(), 0.0);
  EXPECT_MATRIX_NEAR(fast.weight(), again.weight(), 0.0);
  // Whatever the spectrum, the initialised layer equals the original one.
  EXPECT_MATRIX_NEAR(Eigen::MatrixXd(fast.weight() + fast.scaling() * fast.B() * fast.A()), W,
                     1e-12);
}

// LoftQ on the 4-bit base, five iterations: the base after t iterations is PEFT's Q_t, the adapter
// its (A_t, B_t), and the error ||W - (Q_t + B_t A_t)|| PEFT's err_t, below QLoRA's.
TEST(Inits, LoftqMatchesPeftOnNf4) {
  const Fixture f = load("loftq_nf4");
  const Eigen::MatrixXf W0 = f.st.matrix<float>("W0");
  lora::Nf4Options opts;
  opts.double_quantization = false;  // the fixture's bitsandbytes settings
  const double err_qlora = f.st.vector<double>("err_qlora")(0);
  for (int t = 1; t <= 5; ++t) {
    SCOPED_TRACE("iterations " + std::to_string(t));
    LoRAConfig cfg = config_of(f, Init::LoftQ);
    cfg.loftq_iterations = t;
    LoRALinear<float, Nf4FrozenWeight> layer(Nf4FrozenWeight(W0, opts), {}, cfg, W0);
    const std::string i = std::to_string(t);
    const Eigen::MatrixXf Q = f.st.matrix<float>("Q_deq_" + i);
    EXPECT_LE(differing_codes(layer.weight(), Q), 2) << "codes differing from PEFT's Q";
    const Eigen::MatrixXf BA = f.st.matrix<float>("B_" + i) * f.st.matrix<float>("A_" + i);
    EXPECT_MATRIX_NEAR(Eigen::MatrixXf(layer.B() * layer.A()), BA, 1e-5);
    const double err =
        (W0 - layer.weight() - layer.scaling() * layer.B() * layer.A()).cast<double>().norm();
    EXPECT_NEAR(err, f.st.vector<double>("err_" + i)(0), 1e-5 * err);
    EXPECT_LT(err, err_qlora);
  }
  // The other face, and LoftQ's rules: a 4-bit storage and the full-precision W0.
  LoRAConfig cfg = config_of(f, Init::LoftQ);
  MultiLoRALinear<float, Nf4FrozenWeight> multi{Nf4FrozenWeight(W0, opts)};
  const auto& a = multi.add_adapter("loftq", cfg, W0);
  EXPECT_MATRIX_NEAR(Eigen::MatrixXf(a.B() * a.A()),
                     Eigen::MatrixXf(f.st.matrix<float>("B_1") * f.st.matrix<float>("A_1")), 1e-5);
  EXPECT_THROW(multi.add_adapter("needs_w0", cfg), std::invalid_argument);
  EXPECT_THROW((LoRALinear<float>(W0, cfg)), std::invalid_argument);  // no 4-bit base
}

// LoftQ with alpha != r: lora divides the factors by s (PEFT does not), so the initialised layer
// still approximates W better than QLoRA's base alone.
TEST(Inits, LoftqDividesByTheScaling) {
  const Fixture f = load("loftq_nf4");
  const Eigen::MatrixXf W0 = f.st.matrix<float>("W0");
  LoRAConfig cfg = config_of(f, Init::LoftQ);
  cfg.alpha = 4 * cfg.rank;
  cfg.loftq_iterations = 2;
  LoRALinear<float, Nf4FrozenWeight> layer(W0, cfg);  // built from the matrix: W0 at full precision
  const double err = (W0 - layer.weight() - layer.scaling() * layer.B() * layer.A()).norm();
  EXPECT_LT(err, (W0 - Nf4FrozenWeight(W0).weight()).norm());
}

TEST(Inits, OrthogonalHasBAZeroAndNonZeroFactors) {
  LoRAConfig cfg;
  cfg.rank = 6;
  cfg.init = Init::Orthogonal;
  cfg.seed = 3;
  const Eigen::MatrixXd W = Eigen::MatrixXd::Random(20, 14);
  LoRALinear<double> layer(W, cfg);
  EXPECT_GT(layer.A().norm(), 0.1);
  EXPECT_GT(layer.B().norm(), 0.1);
  EXPECT_LT((layer.B() * layer.A()).norm(), 1e-14 * layer.A().norm() * layer.B().norm());
  EXPECT_MATRIX_NEAR(layer.weight(), W, 0.0);  // the base is untouched
  MultiLoRALinear<double> multi(W);
  EXPECT_MATRIX_NEAR(multi.add_adapter("o", cfg).A(), layer.A(), 0.0);  // seeded
  cfg.rank = 5;
  EXPECT_THROW((LoRALinear<double>(W, cfg)), std::invalid_argument);
}

// The conversion of a trained PiSSA adapter to the plain adapter of the original W0 (PEFT's
// path_initial_model_for_weight_conversion), and the file it is saved as, loaded back by lora.
void check_conversion(const std::string& name) {
  SCOPED_TRACE(name);
  const Fixture f = load(name);
  const Eigen::MatrixXd W0 = f.st.matrix<double>("W0");
  LoRAConfig cfg = config_of(f, Init::PiSSA);
  LoRALinear<double> layer(W0, cfg);
  EXPECT_MATRIX_NEAR(layer.weight(), f.st.matrix<double>("W_res"), 1e-12);
  // "Training": PEFT's trained factors, with our initial factors' signs (A0, B0 differ from PEFT's
  // by the sign of each component; the trained A, B are PEFT's A0, B0 plus noise).
  Eigen::MatrixXd A = f.st.matrix<double>("A"), B = f.st.matrix<double>("B");
  const Eigen::MatrixXd A0p = f.st.matrix<double>("A0");
  for (Eigen::Index i = 0; i < A.rows(); ++i)
    if (layer.A().row(i).dot(A0p.row(i)) < 0) {
      A.row(i) *= -1;
      B.col(i) *= -1;
    }
  layer.set_adapter_weights(A, B);
  const Eigen::MatrixXd X = f.st.matrix<double>("x").transpose();
  const Eigen::MatrixXd y_trained = f.st.matrix<double>("y_trained").transpose();
  EXPECT_MATRIX_NEAR(layer.forward(X), y_trained, 1e-12);

  const lora::LoRAAdapter<double> plain = lora::plain_adapter(layer);
  EXPECT_EQ(plain.rank(), f.meta["r_converted"].get<int>());
  EXPECT_NEAR(plain.config().alpha, f.meta["lora_alpha_converted"].get<double>(), 1e-12);
  EXPECT_EQ(plain.config().init, Init::KaimingUniform);
  EXPECT_MATRIX_NEAR(Eigen::MatrixXd(plain.B() * plain.A()),
                     Eigen::MatrixXd(f.st.matrix<double>("B_conv") * f.st.matrix<double>("A_conv")),
                     1e-12);
  LoRALinear<double> original(W0, LoRAConfig{});
  original.replace_adapter(plain);
  EXPECT_MATRIX_NEAR(original.forward(X), f.st.matrix<double>("y_converted_on_W0").transpose(),
                     1e-12);

  // Saved converted, the file is a plain PEFT adapter of W0; loaded onto W0 it gives the trained
  // model's outputs. Saved as it is, its config names the init (it needs the residual base).
  const std::string dir = std::string(LORA_TEST_TMP_DIR) + "/inits_" + name;
  lora::peft::SaveOptions convert;
  convert.convert_to_plain = true;
  const std::map<std::string, const LoRALinear<double>*> layers{{"fc", &layer}};
  const auto written = lora::peft::save_adapter(dir, layers, convert);
  EXPECT_EQ(written.init_lora_weights, "true");
  EXPECT_EQ(written.r, plain.rank());
  LoRALinear<double> loaded(W0, LoRAConfig{});
  lora::peft::load_adapter(dir, std::map<std::string, LoRALinear<double>*>{{"fc", &loaded}});
  EXPECT_MATRIX_NEAR(loaded.forward(X), y_trained, 1e-12);
  EXPECT_EQ(lora::peft::save_adapter(dir + "_residual", layers).init_lora_weights, "pissa");
}

TEST(Inits, PissaConvertsToPlainAdapter) {
  check_conversion("pissa_to_lora");
  check_conversion("pissa_to_lora_rslora");
}

TEST(Inits, PeftNamesRoundTrip) {
  Init init{};
  int n = -1;
  EXPECT_TRUE(lora::init_from_peft_name("pissa_niter_4", init, n));
  EXPECT_EQ(init, Init::PiSSA);
  EXPECT_EQ(n, 4);
  EXPECT_EQ(lora::peft_init_name(init, n), "pissa_niter_4");
  for (Init i : {Init::Gaussian, Init::PiSSA, Init::OLoRA, Init::LoftQ, Init::Orthogonal}) {
    ASSERT_TRUE(lora::init_from_peft_name(lora::peft_init_name(i), init, n));
    EXPECT_EQ(init, i);
  }
  EXPECT_FALSE(lora::init_from_peft_name("pissa_niter_", init, n));
  EXPECT_FALSE(lora::init_from_peft_name("eva", init, n));
}

TEST(Inits, RefusesWhatItCannotDo) {
  const Eigen::MatrixXd W = Eigen::MatrixXd::Random(8, 6);
  LoRAConfig cfg;
  cfg.rank = 2;
  cfg.init = Init::PiSSA;
  cfg.use_dora = true;
  EXPECT_THROW((LoRALinear<double>(W, cfg)), std::invalid_argument);
  cfg.use_dora = false;
  cfg.svd_iterations = -1;
  EXPECT_THROW((LoRALinear<double>(W, cfg)), std::invalid_argument);
  cfg.svd_iterations = 0;
  MultiLoRALinear<double> multi(W);
  multi.add_adapter("plain", LoRAConfig{2, 4.0});
  multi.set_active("plain");
  multi.merge();
  EXPECT_THROW(multi.add_adapter("pissa", cfg), std::logic_error);  // W0 is not held while merged
  // A PiSSA adapter that never joined a layer has no residual base to convert from.
  EXPECT_THROW(lora::plain_adapter(lora::LoRAAdapter<double>(8, 6, cfg)), std::invalid_argument);
}

}  // namespace test_inits

namespace test_inits {

// LoRA+: B trains with lr * ratio, A with lr: the same as two AdamWs with those rates. LoRA-FA: A
// stays where it started.
TEST(Inits, LoraPlusAndFrozenA) {
  const Eigen::MatrixXd W = Eigen::MatrixXd::Random(7, 5), X = Eigen::MatrixXd::Random(5, 4);
  LoRAConfig cfg;
  cfg.rank = 2;
  cfg.init = Init::Orthogonal;  // A and B both non-zero: both get gradients
  LoRALinear<double> one(W, cfg), two(W, cfg);
  lora::AdamWOptions o;
  o.lr = 1e-2;
  o.loraplus_lr_ratio = 16;
  lora::AdamW<double> plus(one.parameters(), o);
  o.loraplus_lr_ratio = 1;
  auto views = two.parameters();
  lora::AdamW<double> opt_a({views[0]}, o);
  o.lr *= 16;
  lora::AdamW<double> opt_b({views[1]}, o);
  for (int step = 0; step < 3; ++step) {
    plus.zero_grad();
    opt_a.zero_grad();
    opt_b.zero_grad();
    one.backward(X, one.forward(X));
    two.backward(X, two.forward(X));
    plus.step();
    opt_a.step();
    opt_b.step();
  }
  EXPECT_MATRIX_NEAR(one.A(), two.A(), 1e-15);
  EXPECT_MATRIX_NEAR(one.B(), two.B(), 1e-15);

  LoRALinear<double> fa(W, cfg);
  const Eigen::MatrixXd A0 = fa.A(), B0 = fa.B();
  lora::AdamWOptions frozen;
  frozen.freeze_A = true;
  lora::AdamW<double> opt(fa.parameters(), frozen);
  fa.backward(X, fa.forward(X));
  opt.step();
  EXPECT_MATRIX_NEAR(fa.A(), A0, 0.0);
  EXPECT_GT((fa.B() - B0).norm(), 0.0);
}

}  // namespace test_inits
