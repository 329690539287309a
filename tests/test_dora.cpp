// DoRA (weight-decomposed LoRA, PEFT's use_dora) against independent numbers: PEFT's own layers
// (tests/fixtures/peft-dora/, copied from the shared fixtures; generate_dora.py there made them),
// finite differences where the loss is linear (m, X), a dense double computation that forms
// W0 + s B A (what the layer avoids), and the cancellation the norm formula can suffer.
#include "test_helpers.hpp"

#include <lora/io/atomic_file.hpp>
#include <lora/io/safetensors.hpp>
#include <lora/lora.hpp>
#include <lora/peft/adapter_io.hpp>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace test_dora {
namespace {

using Eigen::MatrixXd;
using Eigen::VectorXd;
using lora::test::fixture_path;

/// The L2 norm of each row, with a scalar square root (GCC 12 at -O3 with AVX-512 warns, wrongly,
/// inside Eigen's vectorised double sqrt, and the build treats warnings as errors).
VectorXd row_norms(const MatrixXd& W) {
  VectorXd out(W.rows());
  for (Eigen::Index i = 0; i < W.rows(); ++i) out(i) = std::sqrt(W.row(i).squaredNorm());
  return out;
}

MatrixXd random(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed, double stddev = 1.0) {
  lora::Rng rng(seed);
  MatrixXd m(rows, cols);
  lora::fill_normal(m, rng, 0.0, stddev);
  return m;
}

/// The dense reference of DoRA in double, forming W = W0 + s B A (PEFT's way):
/// H = m / ||W||_row .* (W0 Xd + s B A Xd) + W0 (X - Xd) + b, Xd = M .* X (M = 1: no dropout).
struct DenseDora {
  MatrixXd W0, A, B;
  VectorXd m, b;
  double s;

  VectorXd norms() const { return row_norms(W0 + s * B * A); }
  VectorXd c() const { return m.cwiseQuotient(norms()); }
  MatrixXd forward(const MatrixXd& X, const MatrixXd& M) const {
    const MatrixXd Xd = X.cwiseProduct(M);
    MatrixXd H = c().asDiagonal() * ((W0 + s * B * A) * Xd) + W0 * (X - Xd);
    if (b.size()) H.colwise() += b;
    return H;
  }
  // Gradients of sum(G .* H) with the norm held constant.
  MatrixXd dA(const MatrixXd& X, const MatrixXd& G, const MatrixXd& M) const {
    return s * B.transpose() * c().asDiagonal() * G * X.cwiseProduct(M).transpose();
  }
  MatrixXd dB(const MatrixXd& X, const MatrixXd& G, const MatrixXd& M) const {
    return s * c().asDiagonal() * G * (A * X.cwiseProduct(M)).transpose();
  }
  VectorXd dm(const MatrixXd& X, const MatrixXd& G, const MatrixXd& M) const {
    const MatrixXd Z = (W0 + s * B * A) * X.cwiseProduct(M);
    return G.cwiseProduct(norms().cwiseInverse().asDiagonal() * Z).rowwise().sum();
  }
  MatrixXd dX(const MatrixXd& G, const MatrixXd& M) const {
    const MatrixXd Gc = c().asDiagonal() * G;
    const MatrixXd W = W0 + s * B * A;
    return W0.transpose() * G + M.cwiseProduct(W.transpose() * Gc - W0.transpose() * G);
  }
};

// ---- PEFT's per-layer cases, both faces
// -----------------------------------------------------------

struct PeftCase {
  std::string name;
  lora::io::SafeTensors st;
  nlohmann::json meta;
  bool is_float() const { return meta["dtype"].get<std::string>() == "torch.float32"; }
  double tol() const { return is_float() ? 2e-5 : 1e-12; }
  lora::LoRAConfig config() const {
    lora::LoRAConfig cfg;
    cfg.rank = meta["r"].get<int>();
    cfg.alpha = meta["lora_alpha"].get<double>();
    cfg.use_rslora = meta["use_rslora"].get<bool>();
    cfg.use_dora = true;
    return cfg;
  }
  VectorXd bias() const {
    return meta["bias"].get<bool>() ? st.vector<double>("bias") : VectorXd();
  }
};

PeftCase load_case(const std::string& name) {
  auto st = lora::io::SafeTensors::load(fixture_path("peft-dora/" + name + ".safetensors"));
  std::ifstream meta_file(fixture_path("peft-dora/" + name + ".json"));
  return {name, std::move(st), nlohmann::json::parse(meta_file)};
}

const char* const kCases[] = {"dora_f64_basic", "dora_f64_rslora_bias", "dora_f64_rank1",
                              "dora_f32_wide"};

/// Builds the face (LoRALinear or MultiLoRALinear with another adapter beside "task"), checks
/// PEFT's initial magnitude, loads A, B, m and runs forward, backward, merge and unmerge.
template <typename T, bool Multi>
void check_case(const PeftCase& pc, bool forward_first) {
  using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  using Vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;
  const double tol = pc.tol();
  const Mat W0 = pc.st.matrix<T>("W0");
  const Vec bias = pc.bias().template cast<T>();
  const lora::LoRAConfig cfg = pc.config();
  using Layer = std::conditional_t<Multi, lora::MultiLoRALinear<T>, lora::LoRALinear<T>>;
  auto make = [&] {
    if constexpr (Multi) {
      Layer l(W0, bias);
      lora::LoRAConfig other = cfg;
      other.use_dora = false;
      other.seed = 3;
      l.add_adapter("other", other).B().setConstant(T(0.5));
      l.add_adapter("task", cfg);
      l.set_active("task");
      return l;
    } else {
      return Layer(W0, bias, cfg);
    }
  };
  Layer layer = make();
  auto& a = [&]() -> lora::LoRAAdapter<T>& {
    if constexpr (Multi) {
      return layer.adapter("task");
    } else {
      return layer.adapter();
    }
  }();
  // PEFT's initialisation: m = the row norms of W0.
  EXPECT_FALSE(a.magnitude_pending());
  EXPECT_MATRIX_NEAR(a.magnitude(), pc.st.vector<double>("m_init"), tol);
  a.set_weights(pc.st.matrix<T>("A"), pc.st.matrix<T>("B"));
  a.set_magnitude(pc.st.vector<T>("m"));
  const Mat X = pc.st.matrix<T>("x").transpose(), G = pc.st.matrix<T>("G").transpose();
  if (forward_first) {
    EXPECT_MATRIX_NEAR(layer.forward(X), pc.st.matrix<double>("y").transpose(), tol);
  }
  layer.zero_grad();
  const Mat dX = layer.backward(X, G);  // from the forward's tape, or recomputed
  EXPECT_MATRIX_NEAR(dX, pc.st.matrix<double>("dx").transpose(), tol);
  EXPECT_MATRIX_NEAR(a.grad_A(), pc.st.matrix<double>("dA"), tol);
  EXPECT_MATRIX_NEAR(a.grad_B(), pc.st.matrix<double>("dB"), tol);
  EXPECT_MATRIX_NEAR(a.grad_magnitude(), pc.st.vector<double>("dm"), tol);
  layer.eval();
  EXPECT_MATRIX_NEAR(layer.forward(X), pc.st.matrix<double>("y").transpose(), tol);
  layer.merge();
  EXPECT_MATRIX_NEAR(layer.weight(), pc.st.matrix<double>("W_merged"), tol);
  EXPECT_MATRIX_NEAR(layer.forward(X), pc.st.matrix<double>("y_merged").transpose(), tol);
  layer.unmerge();
  EXPECT_MATRIX_NEAR(layer.weight(), pc.st.matrix<double>("W_unmerged"), tol);
  EXPECT_MATRIX_NEAR(layer.weight(), W0, tol);
}

TEST(DoraPeft, EveryCaseOnBothFacesWithAndWithoutAPrecedingForward) {
  for (const char* name : kCases) {
    SCOPED_TRACE(name);
    const PeftCase pc = load_case(name);
    for (bool forward_first : {true, false}) {
      SCOPED_TRACE(forward_first ? "forward, then backward (the tape)" : "backward alone");
      if (pc.is_float()) {
        check_case<float, false>(pc, forward_first);
        check_case<float, true>(pc, forward_first);
      } else {
        check_case<double, false>(pc, forward_first);
        check_case<double, true>(pc, forward_first);
      }
    }
  }
}

TEST(DoraPeft, TheFormulasOfTheFixturesReadmeReproducePeft) {
  // Guards the reference used below: the dense formulas are PEFT's numbers.
  const PeftCase pc = load_case("dora_f64_rslora_bias");
  DenseDora ref{pc.st.matrix<double>("W0"),
                pc.st.matrix<double>("A"),
                pc.st.matrix<double>("B"),
                pc.st.vector<double>("m"),
                pc.bias(),
                pc.meta["scaling"].get<double>()};
  const MatrixXd X = pc.st.matrix<double>("x").transpose(),
                 G = pc.st.matrix<double>("G").transpose();
  const MatrixXd ones = MatrixXd::Ones(X.rows(), X.cols());
  EXPECT_MATRIX_NEAR(ref.forward(X, ones), pc.st.matrix<double>("y").transpose(), 1e-13);
  EXPECT_MATRIX_NEAR(ref.dA(X, G, ones), pc.st.matrix<double>("dA"), 1e-13);
  EXPECT_MATRIX_NEAR(ref.dm(X, G, ones), pc.st.vector<double>("dm"), 1e-13);
  EXPECT_MATRIX_NEAR(ref.dX(G, ones), pc.st.matrix<double>("dx").transpose(), 1e-13);
}

// ---- finite differences and the dense reference
// -----------------------------------------------------

struct Rig {
  static constexpr Eigen::Index d = 9, k = 7, r = 3, n = 5;
  MatrixXd W0 = random(d, k, 1), X = random(k, n, 2), R = random(d, n, 3);
  VectorXd b = random(d, 1, 4).col(0);
  lora::LoRAConfig cfg = [] {
    lora::LoRAConfig c;
    c.rank = 3;
    c.alpha = 4.5;
    c.seed = 5;
    c.use_dora = true;
    return c;
  }();
  lora::LoRALinear<double> make() const {
    lora::LoRALinear<double> l(W0, b, cfg);
    l.B() = random(d, r, 6, 0.4);
    l.magnitude() = l.magnitude().cwiseProduct(VectorXd::Ones(d) + random(d, 1, 7, 0.2).col(0));
    return l;
  }
  DenseDora reference(const lora::LoRALinear<double>& l) const {
    return {W0, l.A(), l.B(), l.magnitude(), b, l.scaling()};
  }
};

TEST(Dora, GradientOfMAndXMatchFiniteDifferences) {
  // L = sum(R .* H) is linear in m and in X (the norm depends on neither): central differences
  // with a step of 0.5 are exact up to rounding.
  Rig su;
  auto layer = su.make();
  layer.zero_grad();
  layer.forward(su.X);
  const MatrixXd dX = layer.backward(su.X, su.R);
  auto loss = [&](const MatrixXd& X) { return (layer.forward(X).array() * su.R.array()).sum(); };
  VectorXd fd_m(su.d);
  for (Eigen::Index i = 0; i < su.d; ++i) {
    const double saved = layer.magnitude()(i);
    layer.magnitude()(i) = saved + 0.5;
    const double up = loss(su.X);
    layer.magnitude()(i) = saved - 0.5;
    const double down = loss(su.X);
    layer.magnitude()(i) = saved;
    fd_m(i) = up - down;
  }
  EXPECT_MATRIX_NEAR(layer.grad_magnitude(), fd_m, 1e-10);
  MatrixXd Xp = su.X, fd_x(su.k, su.n);
  for (Eigen::Index j = 0; j < su.n; ++j)
    for (Eigen::Index i = 0; i < su.k; ++i) {
      const double saved = Xp(i, j);
      Xp(i, j) = saved + 0.5;
      const double up = loss(Xp);
      Xp(i, j) = saved - 0.5;
      const double down = loss(Xp);
      Xp(i, j) = saved;
      fd_x(i, j) = up - down;
    }
  EXPECT_MATRIX_NEAR(dX, fd_x, 1e-10);
}

TEST(Dora, GradientsOfAAndBHoldTheNormConstantAsPeftDoes) {
  // With the norm frozen at its value, H is linear in A and in B: finite differences of that
  // loss (formed densely here) equal the layer's gradients; the true gradient differs.
  Rig su;
  auto layer = su.make();
  layer.zero_grad();
  layer.forward(su.X);
  layer.backward(su.X, su.R);
  const DenseDora ref = su.reference(layer);
  const VectorXd c0 = ref.c();
  auto frozen_norm_loss = [&](const MatrixXd& A, const MatrixXd& B) {
    return (su.R.array() * (c0.asDiagonal() * ((su.W0 + ref.s * B * A) * su.X)).array()).sum();
  };
  MatrixXd A = ref.A, B = ref.B;
  auto fd = [&](MatrixXd& p) {
    MatrixXd g(p.rows(), p.cols());
    for (Eigen::Index j = 0; j < p.cols(); ++j)
      for (Eigen::Index i = 0; i < p.rows(); ++i) {
        const double saved = p(i, j);
        p(i, j) = saved + 1e-4;
        const double up = frozen_norm_loss(A, B);
        p(i, j) = saved - 1e-4;
        const double down = frozen_norm_loss(A, B);
        p(i, j) = saved;
        g(i, j) = (up - down) / 2e-4;
      }
    return g;
  };
  EXPECT_MATRIX_NEAR(layer.grad_A(), fd(A), 1e-8);
  EXPECT_MATRIX_NEAR(layer.grad_B(), fd(B), 1e-8);
}

TEST(Dora, DropoutFeedsTheDroppedInputToTheScaledBaseTermAsPeftDoes) {
  Rig su;
  su.cfg.dropout = 0.4;
  auto layer = su.make();
  layer.zero_grad();
  const MatrixXd H = layer.forward(su.X);
  const MatrixXd M = layer.dropout_mask();
  ASSERT_TRUE((M.array() == 0).any());
  const DenseDora ref = su.reference(layer);
  EXPECT_MATRIX_NEAR(H, ref.forward(su.X, M), 1e-13);
  const MatrixXd dX = layer.backward(su.X, su.R);
  EXPECT_MATRIX_NEAR(dX, ref.dX(su.R, M), 1e-13);
  EXPECT_MATRIX_NEAR(layer.grad_A(), ref.dA(su.X, su.R, M), 1e-13);
  EXPECT_MATRIX_NEAR(layer.grad_B(), ref.dB(su.X, su.R, M), 1e-13);
  EXPECT_MATRIX_NEAR(layer.grad_magnitude(), ref.dm(su.X, su.R, M), 1e-13);
  layer.zero_grad();
  layer.backward_without_input_grad(su.X, su.R);
  EXPECT_MATRIX_NEAR(layer.grad_magnitude(), ref.dm(su.X, su.R, M), 1e-13);
  layer.eval();
  EXPECT_MATRIX_NEAR(layer.forward(su.X), ref.forward(su.X, MatrixXd::Ones(su.k, su.n)), 1e-13);
}

TEST(Dora, ABackwardAfterTheAdapterChangedUsesTheNewValuesNotTheForwardsTape) {
  Rig su;
  auto layer = su.make();
  layer.forward(su.X);  // the tape holds this adapter's values
  layer.magnitude().array() += 0.3;
  layer.B()(0, 0) += 0.2;
  layer.zero_grad();
  const MatrixXd dX = layer.backward(su.X, su.R);
  const DenseDora ref = su.reference(layer);
  const MatrixXd ones = MatrixXd::Ones(su.k, su.n);
  EXPECT_MATRIX_NEAR(dX, ref.dX(su.R, ones), 1e-13);
  EXPECT_MATRIX_NEAR(layer.grad_magnitude(), ref.dm(su.X, su.R, ones), 1e-13);
  // ...and another X of the same shape.
  const MatrixXd X2 = random(su.k, su.n, 77);
  layer.forward(su.X);
  layer.zero_grad();
  layer.backward(X2, su.R);
  EXPECT_MATRIX_NEAR(layer.grad_magnitude(), ref.dm(X2, su.R, ones), 1e-13);
}

// ---- the cancellation guard -------------------------------------------------------------------

/// Row 2's update removes all but 2^-e of the row: ||w + s b A||^2 = ||w||^2 + 2 s b.(A w) +
/// s^2 b (A A^T) b cancels to 2^-2e of its terms, far below T's precision (the third term rounds
/// when B (A A^T) is formed in T). The guard must recompute that row exactly; without it the norm
/// (and so the output and the merged weight) would be noise or NaN. Small integers in W0, A = w and
/// unit-vector inputs make the layer's own products exact, so only the norm can go wrong.
template <typename T>
void check_cancellation(int e, double tol) {
  using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  const Eigen::Index d = 6, k = 40;
  const MatrixXd W0 = (random(d, k, 11) * 5).array().round().cwiseMax(-15).cwiseMin(15).matrix();
  lora::LoRAConfig cfg;
  cfg.rank = 1;
  cfg.alpha = 2;  // s = 2
  cfg.use_dora = true;
  lora::LoRALinear<T> layer(W0.cast<T>(), Eigen::Matrix<T, Eigen::Dynamic, 1>(), cfg);
  layer.A() = W0.row(2).template cast<T>();
  Mat B = (random(d, 1, 12) * 0.01).template cast<T>();
  B(2, 0) = static_cast<T>(-(1 - std::ldexp(1.0, -e)) / 2);  // s b A = -(1 - 2^-e) w
  layer.B() = B;
  layer.magnitude().setConstant(T(1));
  // The reference: the rows as stored, normalised in double.
  const MatrixXd Wq = W0 + 2.0 * B.template cast<double>() * W0.row(2);
  const VectorXd norms = row_norms(Wq);
  ASSERT_NEAR(norms(2), std::ldexp(W0.row(2).norm(), -e), 1e-30);
  const MatrixXd ref = norms.cwiseInverse().asDiagonal() * Wq;  // H for X = I
  layer.eval();
  const Mat H = layer.forward(Mat::Identity(k, k));
  ASSERT_TRUE(H.allFinite());
  EXPECT_MATRIX_NEAR(H, ref, tol);
  EXPECT_MATRIX_NEAR(H.row(2), ref.row(2), tol);  // a unit direction
  layer.merge();                                  // the merge uses the same norms
  EXPECT_MATRIX_NEAR(layer.weight(), ref, tol);
  EXPECT_MATRIX_NEAR(layer.weight().row(2), ref.row(2), tol);
}

TEST(Dora, ARowThatTheUpdateNearlyCancelsIsRecomputedExactly) {
  check_cancellation<float>(20, 1e-6);
  check_cancellation<double>(45, 1e-14);
}

// ---- mixed batches ------------------------------------------------------------------------------

TEST(Dora, MixedBatchesMatchEachGroupRunAloneWithAndWithoutDropout) {
  for (double p : {0.0, 0.5}) {
    SCOPED_TRACE(p);
    Rig su;
    lora::MultiLoRALinear<double> layer(su.W0, su.b);
    auto cfg = su.cfg;
    cfg.dropout = p;
    layer.add_adapter("dora", cfg).B() = random(su.d, su.r, 21, 0.4);
    layer.adapter("dora").magnitude().array() *= 1.1;
    auto lcfg = su.cfg;
    lcfg.use_dora = false;
    lcfg.seed = 8;
    layer.add_adapter("lora", lcfg).B() = random(su.d, su.r, 22);
    cfg.seed = 9;
    cfg.rank = 2;
    cfg.dropout = 0;
    layer.add_adapter("dora2", cfg).B() = random(su.d, 2, 23, 0.3);
    const Eigen::Index n = 8;
    const MatrixXd X = random(su.k, n, 24), G = random(su.d, n, 25);
    const std::vector<int> which = {0, 1, 2, -1, 0, 2, 0, 1};
    layer.zero_grad();
    const MatrixXd H = layer.forward_mixed(X, which);
    const MatrixXd M = layer.dropout_mask();
    const MatrixXd dX = layer.backward_mixed(X, which, G);
    MatrixXd H_ref = su.W0 * X, dX_ref = su.W0.transpose() * G;
    H_ref.colwise() += su.b;
    const MatrixXd ones = MatrixXd::Ones(su.k, n);
    for (int a : {0, 2}) {
      const auto& ad = std::as_const(layer).adapter(layer.adapter_names()[a]);
      DenseDora ref{su.W0, ad.A(), ad.B(), ad.magnitude(), su.b, ad.scaling()};
      const MatrixXd Ma = a == 0 && p > 0 ? M : ones;
      const MatrixXd Hd = ref.forward(X, Ma), dXd = ref.dX(G, Ma);
      MatrixXd Ga = MatrixXd::Zero(su.d, n);
      for (Eigen::Index j = 0; j < n; ++j)
        if (which[j] == a) {
          H_ref.col(j) = Hd.col(j);
          dX_ref.col(j) = dXd.col(j);
          Ga.col(j) = G.col(j);
        }
      EXPECT_MATRIX_NEAR(ad.grad_magnitude(), ref.dm(X, Ga, Ma), 1e-13) << a;
      EXPECT_MATRIX_NEAR(ad.grad_A(), ref.dA(X, Ga, Ma), 1e-13) << a;
      EXPECT_MATRIX_NEAR(ad.grad_B(), ref.dB(X, Ga, Ma), 1e-13) << a;
    }
    const auto& lo = std::as_const(layer).adapter("lora");
    for (Eigen::Index j = 0; j < n; ++j)
      if (which[j] == 1) {
        H_ref.col(j) += lo.scaling() * lo.B() * (lo.A() * X.col(j));
        dX_ref.col(j) += lo.scaling() * lo.A().transpose() * (lo.B().transpose() * G.col(j));
      }
    EXPECT_MATRIX_NEAR(H, H_ref, 1e-13);
    EXPECT_MATRIX_NEAR(dX, dX_ref, 1e-13);
  }
}

// ---- the adapter and the layer's rules ----------------------------------------------------------

TEST(Dora, TheMagnitudeIsATrainableParameterBesideAAndB) {
  Rig su;
  auto layer = su.make();
  EXPECT_EQ(layer.trainable_parameter_count(), su.r * (su.d + su.k) + su.d);
  auto params = lora::adapter_parameters(layer);
  ASSERT_EQ(params.size(), 3u);
  EXPECT_EQ(params[2].name, "magnitude");
  layer.forward(su.X);
  layer.zero_grad();
  layer.backward(su.X, su.R);
  const VectorXd m0 = layer.magnitude(), g = layer.grad_magnitude();
  lora::SGD<double> opt(params, {0.1});
  opt.step();
  EXPECT_MATRIX_NEAR(layer.magnitude(), m0 - 0.1 * g, 1e-15);
}

TEST(Dora, RefusesWhatItCannotDo) {
  Rig su;
  auto layer = su.make();
  // PEFT refuses lora_bias with DoRA.
  EXPECT_THROW(layer.adapter().set_lora_bias(VectorXd::Ones(su.d)), std::invalid_argument);
  // A magnitude of the wrong length.
  EXPECT_THROW(layer.adapter().set_magnitude(VectorXd::Ones(su.d + 1)), std::invalid_argument);
  lora::LoRAAdapter<double> bad(su.d, su.k, su.cfg);
  bad.magnitude().resize(2);
  EXPECT_THROW(layer.replace_adapter(bad), std::invalid_argument);
  // set_magnitude on a plain LoRA adapter.
  auto lcfg = su.cfg;
  lcfg.use_dora = false;
  lora::LoRAAdapter<double> plain(su.d, su.k, lcfg);
  EXPECT_THROW(plain.set_magnitude(VectorXd::Ones(su.d)), std::invalid_argument);
  // A non-finite magnitude does not merge.
  layer.magnitude()(1) = std::numeric_limits<double>::quiet_NaN();
  const MatrixXd W = layer.weight();
  EXPECT_THROW(layer.merge(), std::domain_error);
  EXPECT_FALSE(layer.is_merged());
  EXPECT_THROW(layer.check_finite(), std::domain_error);
  // Weighted sums of DoRA adapters.
  lora::MultiLoRALinear<double> multi(su.W0);
  multi.add_adapter("a", su.cfg);
  multi.add_adapter("b", su.cfg);
  EXPECT_THROW(multi.add_weighted_adapter("ab", {"a", "b"}, {1.0, 1.0}, lora::Combination::Cat),
               std::invalid_argument);
}

TEST(Dora, AMergedLayerRefusesAChangedMagnitudeAndUnmergeStillGivesW0Back) {
  Rig su;
  lora::LoRALinear<double> layer(
      lora::DenseFrozenWeight<double>(su.W0, lora::MergeMode::ExactRestore), su.b, su.cfg);
  layer.B() = random(su.d, su.r, 6, 0.4);
  layer.merge();
  layer.magnitude()(0) *= 2;
  EXPECT_THROW(layer.forward(su.X), std::logic_error);
  layer.unmerge();
  const MatrixXd W = layer.weight();
  EXPECT_EQ(std::memcmp(W.data(), su.W0.data(), sizeof(double) * W.size()), 0);
  EXPECT_NO_THROW(layer.forward(su.X));
}

TEST(Dora, AFreshAdapterTakesTheRowNormsOfW0AndStartsEqualToTheBase) {
  Rig su;
  lora::LoRAAdapter<double> fresh(su.d, su.k, su.cfg);
  EXPECT_TRUE(fresh.magnitude_pending());
  lora::MultiLoRALinear<double> layer(su.W0, su.b);
  auto& a = layer.add_adapter("x", fresh);
  EXPECT_FALSE(a.magnitude_pending());
  EXPECT_MATRIX_NEAR(a.magnitude(), row_norms(su.W0), 1e-15);
  layer.set_active("x");
  MatrixXd base = su.W0 * su.X;
  base.colwise() += su.b;
  EXPECT_MATRIX_NEAR(layer.forward(su.X), base, 1e-14);  // B = 0: c = 1
  // A loaded magnitude is kept.
  lora::LoRAAdapter<double> loaded(su.d, su.k, su.cfg);
  loaded.set_magnitude(VectorXd::Constant(su.d, 3.0));
  EXPECT_MATRIX_NEAR(layer.add_adapter("y", loaded).magnitude(), VectorXd::Constant(su.d, 3.0),
                     0.0);
}

// ---- PEFT's whole DoRA adapters: llama (Linear) and GPT-2 (Conv1D, fan_in_fan_out)
// ----------------

using Layer = lora::LoRALinear<float>;

/// The base layers of `<name>_modules.safetensors` (W0 as out x in: GPT-2's Conv1D weight, stored
/// in x out, is transposed), with PEFT's per-module input x and output y.
struct PeftModel {
  std::map<std::string, std::unique_ptr<Layer>> layers;
  std::map<std::string, Eigen::MatrixXf> x, y;
  std::map<std::string, Layer*> targets() {
    std::map<std::string, Layer*> out;
    for (auto& [path, layer] : layers) out[path] = layer.get();
    return out;
  }
};

PeftModel load_model(const std::string& name, bool conv1d) {
  const auto st =
      lora::io::SafeTensors::load(fixture_path("peft-dora/" + name + "_modules.safetensors"));
  PeftModel m;
  const std::string prefix = "base_model/model/";
  for (const auto& key : st.names()) {
    if (key.size() < 3 || key.compare(key.size() - 3, 3, "/W0") != 0) continue;
    const std::string base = key.substr(0, key.size() - 3);
    std::string path = base.substr(prefix.size());
    std::replace(path.begin(), path.end(), '/', '.');
    Eigen::MatrixXf W0 = st.matrix<float>(key);
    if (conv1d) W0.transposeInPlace();
    Eigen::VectorXf bias;
    if (st.contains(base + "/bias")) bias = st.vector<float>(base + "/bias");
    lora::LoRAConfig cfg;
    cfg.rank = 1;
    m.layers[path] = std::make_unique<Layer>(std::move(W0), std::move(bias), cfg);
    m.x[path] = st.matrix<float>(base + "/x").transpose();
    m.y[path] = st.matrix<float>(base + "/y").transpose();
  }
  return m;
}

std::string tmp_dir(const std::string& name) {
  const std::string dir = std::string(LORA_TEST_TMP_DIR) + "/" + name;
  ::mkdir(dir.c_str(), 0777);
  return dir;
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

const std::pair<const char*, bool> kAdapters[] = {{"llama_dora", false}, {"gpt2_dora", true}};

TEST(DoraPeftFiles, BothAdaptersReproducePeftsPerModuleOutputs) {
  for (const auto& [name, conv1d] : kAdapters) {
    SCOPED_TRACE(name);
    PeftModel m = load_model(name, conv1d);
    ASSERT_FALSE(m.layers.empty());
    const auto cfg =
        lora::peft::load_adapter(fixture_path(std::string("peft-dora/") + name), m.targets());
    EXPECT_TRUE(cfg.use_dora);
    EXPECT_EQ(cfg.fan_in_fan_out, conv1d);
    for (auto& [path, layer] : m.layers) {
      SCOPED_TRACE(path);
      EXPECT_TRUE(layer->config().use_dora);
      EXPECT_EQ(layer->magnitude().size(), layer->out_features());
      EXPECT_MATRIX_NEAR(layer->forward(m.x[path]), m.y[path], 2e-5);
      layer->eval();
      EXPECT_MATRIX_NEAR(layer->forward(m.x[path]), m.y[path], 2e-5);
      layer->merge();
      EXPECT_MATRIX_NEAR(layer->forward(m.x[path]), m.y[path], 2e-5);
      layer->unmerge();
    }
  }
}

TEST(DoraPeftFiles, SavingALoadedDoraAdapterWritesPeftsBytesAgain) {
  for (const auto& [name, conv1d] : kAdapters) {
    SCOPED_TRACE(name);
    PeftModel m = load_model(name, conv1d);
    const std::string dir = fixture_path(std::string("peft-dora/") + name);
    lora::peft::SaveOptions opt;
    opt.base = lora::peft::load_adapter(dir, m.targets());
    const std::string out = tmp_dir(std::string("resaved_") + name);
    lora::peft::save_adapter(out, m.targets(), opt);
    EXPECT_TRUE(lora::test::read_bytes(out + "/adapter_model.safetensors") ==
                lora::test::read_bytes(dir + "/adapter_model.safetensors"));
    EXPECT_EQ(read_json(out + "/adapter_config.json"), read_json(dir + "/adapter_config.json"));
    // A fresh save (no base config) says use_dora too, and loads back into the same outputs.
    const std::string fresh = tmp_dir(std::string("fresh_") + name);
    const auto written = lora::peft::save_adapter(fresh, m.targets());
    EXPECT_TRUE(written.use_dora);
    PeftModel again = load_model(name, conv1d);
    lora::peft::load_adapter(fresh, again.targets());
    for (auto& [path, layer] : again.layers)
      EXPECT_MATRIX_NEAR(layer->forward(again.x[path]), m.y[path], 2e-5) << path;
  }
}

TEST(DoraPeftFiles, MultiLoRALinearTakesADoraAdapterBesideOthers) {
  PeftModel m = load_model("llama_dora", false);
  std::map<std::string, std::unique_ptr<lora::MultiLoRALinear<float>>> multi;
  std::map<std::string, lora::MultiLoRALinear<float>*> targets;
  for (auto& [path, layer] : m.layers) {
    multi[path] =
        std::make_unique<lora::MultiLoRALinear<float>>(layer->frozen().matrix(), layer->bias());
    multi[path]->add_adapter("plain", lora::LoRAConfig{});
    targets[path] = multi[path].get();
  }
  lora::peft::load_adapter(fixture_path("peft-dora/llama_dora"), targets, "dora");
  for (auto& [path, layer] : multi) {
    layer->set_active("dora");
    EXPECT_MATRIX_NEAR(layer->forward(m.x[path]), m.y[path], 2e-5) << path;
  }
}

TEST(DoraPeftFiles, AMagnitudeWithoutUseDoraIsAFormatError) {
  const std::string dir = tmp_dir("dora_flag_off");
  const std::string src = fixture_path("peft-dora/llama_dora");
  const auto bytes = lora::test::read_bytes(src + "/adapter_model.safetensors");
  lora::io::write_file_atomically(dir + "/adapter_model.safetensors", bytes.data(), bytes.size());
  nlohmann::json j = read_json(src + "/adapter_config.json");
  j["use_dora"] = false;
  lora::io::write_file_atomically(dir + "/adapter_config.json", j.dump(2));
  try {
    lora::peft::read_adapter<float>(dir);
    ADD_FAILURE() << "expected a FormatError";
  } catch (const lora::io::FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("use_dora"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace test_dora
