// The conformance battery: every frozen storage x both layer faces (LoRALinear, MultiLoRALinear)
// against independent numbers (a plain dense computation in double on the weight as stored, finite
// differences, PEFT's own outputs), and the layer's invariants (merge/unmerge exactness, refusals,
// views that cannot dangle, thread safety, no allocation). A new storage gets all of it by adding
// one configuration to kStorages below.
#include "alloc_counter.hpp"
#include "test_helpers.hpp"

#include <lora/io/safetensors.hpp>
#include <lora/lora.hpp>
#if defined(LORA_WITH_ONEDNN)
#include <lora/onednn/onednn_frozen_weight.hpp>
#endif

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace test_conformance {
namespace {

using Eigen::MatrixXd;
using Eigen::VectorXd;
using lora::test::fixture_path;
using lora::test::relative_error;

// ---- storage configurations
// ----------------------------------------------------------------------- Each says how to build
// the storage from a double W0 and how closely its products follow a dense computation on weight()
// (the weight as stored): kProductTol, relative to the largest reference element. kUnit is the unit
// roundoff of the stored type (merge rounds to it). kExactProducts: the product is linear in its
// input (no rounding of X), so finite differences in X are exact too.

template <typename T, lora::MergeMode Mode>
struct Dense {
  using Frozen = lora::DenseFrozenWeight<T>;
  static Frozen make(const MatrixXd& W0) { return Frozen(W0.cast<T>(), Mode); }
  static bool available() { return true; }
  static constexpr lora::MergeMode kMode = Mode;
  static constexpr double kProductTol = std::is_same_v<T, float> ? 2e-5 : 1e-12;
  static constexpr double kUnit = std::numeric_limits<T>::epsilon() / 2;
  static constexpr bool kExactProducts = true;
  static constexpr double kRepresentationTol = 0;
  static constexpr double kHuge = std::numeric_limits<T>::max() * 0.9;
};

template <lora::MergeMode Mode, lora::Bf16Backend Backend>
struct Bf16 {
  using Frozen = lora::Bf16FrozenWeight;
  static Frozen make(const MatrixXd& W0) { return Frozen(W0.cast<float>(), Mode, Backend); }
  static bool available() {
    return Backend != lora::Bf16Backend::OneDnn || lora::Bf16FrozenWeight::onednn_available();
  }
  static constexpr lora::MergeMode kMode = Mode;
  // X and G are rounded to bf16 (u = 2^-8) before the product, accumulated in fp32.
  static constexpr double kProductTol = 1.5e-2;
  static constexpr double kUnit = 1.0 / 256;
  static constexpr bool kExactProducts = false;
  static constexpr double kRepresentationTol = 1.0 / 256;  // W0 rounded to bf16
  static constexpr double kHuge = 3.0e38;
};

template <lora::Nf4Backend Backend>
struct Nf4 {
  using Frozen = lora::Nf4FrozenWeight;
  static Frozen make(const MatrixXd& W0) {
    lora::Nf4Options options;  // double quantization, as QLoRA
    options.backend = Backend;
    return Frozen(W0.cast<float>(), lora::MergeMode::ExactRestore, options);
  }
  static bool available() {
    return Backend != lora::Nf4Backend::OneDnn || lora::Nf4FrozenWeight::onednn_available();
  }
  static constexpr lora::MergeMode kMode =
      lora::MergeMode::ExactRestore;  // the only mode it offers
  // Portable: fp32 products on the dequantized weight; oneDNN: bf16 operands.
  static constexpr bool kExactProducts = Backend == lora::Nf4Backend::Portable;
  static constexpr double kProductTol = kExactProducts ? 2e-5 : 1.5e-2;
  static constexpr double kUnit = std::numeric_limits<float>::epsilon() / 2;  // merges in fp32
  // Against the original W0 (PEFT's numbers): at most half the widest gap between NF4 codes
  // (0.152) times the block's absmax per weight.
  static constexpr double kRepresentationTol = 0.2;
  static constexpr double kHuge = 2.5e38;
};

// DenseFrozenWeight with its products forced onto a BLAS (lora::blas): built only in
// test_dense_blas, which defines LORA_CONFORMANCE_BLAS_ONLY and runs the battery on these alone.
template <typename T, lora::DenseKernel Kernel, lora::MergeMode Mode>
struct DenseBlas : Dense<T, Mode> {
  using Frozen = lora::DenseFrozenWeight<T>;
  static Frozen make(const MatrixXd& W0) { return Frozen(W0.cast<T>(), Mode, Kernel); }
};

#if !defined(LORA_CONFORMANCE_BLAS_ONLY) && !defined(LORA_CONFORMANCE_ONEDNN_ONLY)
/// llama.cpp's block formats: one configuration whose block type is chosen at run time, from the
/// environment variable LORA_TEST_GGML_TYPE (q8_0, q4_0, q4_K, the default, or q6_K): ctest runs
/// the battery's Ggml cases once per type (tests/CMakeLists.txt) from one compiled configuration.
/// W0 (k = 5) is quantized by llama.cpp's quantizer, its rows padded with zeros to a whole block.
struct Ggml {
  using Frozen = lora::GgmlFrozenWeight;
  static lora::io::GgmlType type() {
    const char* env = std::getenv("LORA_TEST_GGML_TYPE");
    const std::string name = env ? env : "q4_K";
    for (auto t : {lora::io::GgmlType::Q8_0, lora::io::GgmlType::Q4_0, lora::io::GgmlType::Q4_K,
                   lora::io::GgmlType::Q6_K})
      if (name == lora::io::ggml_type_traits(t).name) return t;
    throw std::invalid_argument("LORA_TEST_GGML_TYPE must be q8_0, q4_0, q4_K or q6_K, got " +
                                name);
  }
  static Frozen make(const MatrixXd& W0) {
    return Frozen::quantize(W0.cast<float>(), type(), lora::MergeMode::ExactRestore,
                            lora::GgmlBackend::Portable);
  }
  static bool available() { return true; }
  static constexpr lora::MergeMode kMode = lora::MergeMode::ExactRestore;  // the only one
  static constexpr bool kExactProducts = true;  // fp32 products on the dequantized weight
  static constexpr double kProductTol = 2e-5;
  static constexpr double kUnit = std::numeric_limits<float>::epsilon() / 2;  // merges in fp32
  // Against the original W0 (PEFT's numbers): 4-bit levels of the block's range.
  static constexpr double kRepresentationTol = 0.2;
  static constexpr double kHuge = 6e4;  // within fp16 block scales
};

#endif

#if defined(LORA_WITH_ONEDNN)
template <lora::MergeMode Mode>
struct OneDnnF32 {
  using Frozen = lora::onednn::OneDnnFrozenWeight;
  static Frozen make(const MatrixXd& W0) { return Frozen(W0.cast<float>(), Mode); }
  static bool available() { return true; }
  static constexpr lora::MergeMode kMode = Mode;
  static constexpr double kProductTol = 2e-5;
  static constexpr double kUnit = std::numeric_limits<float>::epsilon() / 2;
  static constexpr bool kExactProducts = true;
  static constexpr double kRepresentationTol = 0;
  static constexpr double kHuge = std::numeric_limits<float>::max() * 0.9;
};
#endif

// ---- the two faces
// --------------------------------------------------------------------------------

template <typename C>
struct Single {
  using Config = C;
  using Frozen = typename C::Frozen;
  using T = typename Frozen::Scalar;
  using Layer = lora::LoRALinear<T, Frozen>;
  static constexpr bool kMulti = false;
  static Layer make(const MatrixXd& W0, const VectorXd& b, const lora::LoRAConfig& cfg) {
    return Layer(C::make(W0), b.template cast<T>(), cfg);
  }
  static lora::LoRAAdapter<T>& adapter(Layer& l) { return l.adapter(); }
  static std::vector<lora::ParameterView<T>> parameters(Layer& l) {
    return lora::adapter_parameters(l);
  }
};

/// The multi-adapter face, with a second adapter beside the one under test ("task", active).
template <typename C>
struct Multi {
  using Config = C;
  using Frozen = typename C::Frozen;
  using T = typename Frozen::Scalar;
  using Layer = lora::MultiLoRALinear<T, Frozen>;
  static constexpr bool kMulti = true;
  static Layer make(const MatrixXd& W0, const VectorXd& b, const lora::LoRAConfig& cfg) {
    Layer l(C::make(W0), b.template cast<T>());
    lora::LoRAConfig other = cfg;
    other.seed = cfg.seed + 99;
    l.add_adapter("other", other).B().setConstant(T(0.25));
    l.add_adapter("task", cfg);
    l.set_active("task");
    return l;
  }
  static lora::LoRAAdapter<T>& adapter(Layer& l) { return l.adapter("task"); }
  static std::vector<lora::ParameterView<T>> parameters(Layer& l) {
    return lora::adapter_parameters(l, "task");
  }
};

using lora::Bf16Backend;
using lora::MergeMode;

#if defined(LORA_CONFORMANCE_BLAS_ONLY)
// Every BLAS built in: float in both modes and faces on the first, then one configuration each
// (the kernel is the only difference from the Dense cases above; compile time is kept small).
using lora::DenseKernel;
using Storages = ::testing::Types<
#if defined(LORA_WITH_OPENBLAS)
    Single<DenseBlas<float, DenseKernel::OpenBlas, MergeMode::InPlace>>,
    Multi<DenseBlas<float, DenseKernel::OpenBlas, MergeMode::InPlace>>,
    Single<DenseBlas<float, DenseKernel::OpenBlas, MergeMode::ExactRestore>>,
    Single<DenseBlas<double, DenseKernel::OpenBlas, MergeMode::InPlace>>
#endif
#if defined(LORA_WITH_OPENBLAS) && defined(LORA_WITH_BLIS)
    ,
#endif
#if defined(LORA_WITH_BLIS)
    Single<DenseBlas<float, DenseKernel::Blis, MergeMode::InPlace>>,
    Multi<DenseBlas<float, DenseKernel::Blis, MergeMode::ExactRestore>>
#endif
    >;
#elif defined(LORA_CONFORMANCE_ONEDNN_ONLY) && defined(LORA_WITH_ONEDNN)
// test_bf16_onednn: the oneDNN back ends alone (lora_tests runs every other configuration;
// compiling them twice doubled this file's share of CI's build).
using Storages =
    ::testing::Types<Single<Nf4<lora::Nf4Backend::OneDnn>>, Multi<Nf4<lora::Nf4Backend::OneDnn>>,
                     Single<Bf16<MergeMode::ExactRestore, Bf16Backend::OneDnn>>,
                     Multi<Bf16<MergeMode::ExactRestore, Bf16Backend::OneDnn>>,
                     Single<OneDnnF32<MergeMode::InPlace>>, Multi<OneDnnF32<MergeMode::InPlace>>,
                     Single<OneDnnF32<MergeMode::ExactRestore>>,
                     Multi<OneDnnF32<MergeMode::ExactRestore>>>;
#else
using Storages = ::testing::Types<
    Single<Dense<float, MergeMode::InPlace>>, Multi<Dense<float, MergeMode::InPlace>>,
    Single<Dense<float, MergeMode::ExactRestore>>, Multi<Dense<float, MergeMode::ExactRestore>>,
    Single<Dense<double, MergeMode::InPlace>>, Multi<Dense<double, MergeMode::InPlace>>,
    Single<Dense<double, MergeMode::ExactRestore>>, Multi<Dense<double, MergeMode::ExactRestore>>,
    Single<Bf16<MergeMode::ExactRestore, Bf16Backend::Portable>>,
    Multi<Bf16<MergeMode::ExactRestore, Bf16Backend::Portable>>,
    Single<Bf16<MergeMode::InPlace, Bf16Backend::Portable>>,
    Multi<Bf16<MergeMode::InPlace, Bf16Backend::Portable>>, Single<Nf4<lora::Nf4Backend::Portable>>,
    Multi<Nf4<lora::Nf4Backend::Portable>>, Single<Ggml>, Multi<Ggml>
#if defined(LORA_WITH_ONEDNN)
    ,
    Single<Nf4<lora::Nf4Backend::OneDnn>>, Multi<Nf4<lora::Nf4Backend::OneDnn>>,
    Single<Bf16<MergeMode::ExactRestore, Bf16Backend::OneDnn>>,
    Multi<Bf16<MergeMode::ExactRestore, Bf16Backend::OneDnn>>,
    Single<OneDnnF32<MergeMode::InPlace>>, Multi<OneDnnF32<MergeMode::InPlace>>,
    Single<OneDnnF32<MergeMode::ExactRestore>>, Multi<OneDnnF32<MergeMode::ExactRestore>>
#endif
    >;
#endif  // LORA_CONFORMANCE_BLAS_ONLY

struct Names {
  template <typename Case>
  static std::string GetName(int i) {
    using C = typename Case::Config;
    using Frozen = typename C::Frozen;
    std::string storage;
    if constexpr (std::is_same_v<Frozen, lora::DenseFrozenWeight<float>>) storage = "DenseFloat";
    if constexpr (std::is_same_v<Frozen, lora::DenseFrozenWeight<double>>) storage = "DenseDouble";
    if constexpr (std::is_same_v<Frozen, lora::Bf16FrozenWeight>) storage = "Bf16";
    if constexpr (std::is_same_v<Frozen, lora::Nf4FrozenWeight>) storage = "Nf4";
    if constexpr (std::is_same_v<Frozen, lora::GgmlFrozenWeight>) storage = "Ggml";
#if defined(LORA_WITH_ONEDNN)
    if constexpr (std::is_same_v<Frozen, lora::onednn::OneDnnFrozenWeight>) storage = "OneDnnF32";
#endif
    const std::string mode = C::kMode == MergeMode::InPlace ? "InPlace" : "Exact";
#if defined(LORA_CONFORMANCE_BLAS_ONLY)
    storage = std::string(lora::detail::dense_kernel_name(C::make(MatrixXd::Ones(1, 1)).kernel())) +
              (std::is_same_v<typename Frozen::Scalar, float> ? "Float" : "Double");
#endif
    return std::string(Case::kMulti ? "Multi_" : "Single_") + storage + "_" + mode + "_" +
           std::to_string(i);
  }
};

// ---- the fixture
// ----------------------------------------------------------------------------------

MatrixXd random(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed, double stddev = 1.0) {
  lora::Rng rng(seed);
  MatrixXd m(rows, cols);
  lora::fill_normal(m, rng, 0.0, stddev);
  return m;
}

template <typename M>
bool bit_equal(const M& a, const M& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(typename M::Scalar) * a.size()) == 0;
}

/// The L2 norm of each row, with a scalar square root (GCC 12 at -O3 with AVX-512 warns, wrongly,
/// inside Eigen's vectorised double sqrt, and the build treats warnings as errors).
VectorXd row_norms(const MatrixXd& W) {
  VectorXd out(W.rows());
  for (Eigen::Index i = 0; i < W.rows(); ++i) out(i) = std::sqrt(W.row(i).squaredNorm());
  return out;
}

/// The dense DoRA reference in double on the weight as stored (Wq), forming W = Wq + s B A:
/// H = c .* (W X) + b with c = m / ||W||_row; gradients with the norm held constant.
struct DoraReference {
  MatrixXd Wq, A, B;
  VectorXd m, b;
  double s;
  MatrixXd W() const { return Wq + s * B * A; }
  VectorXd c() const { return m.cwiseQuotient(row_norms(W())); }
  MatrixXd forward(const MatrixXd& X) const {
    MatrixXd H = c().asDiagonal() * (W() * X);
    if (b.size()) H.colwise() += b;
    return H;
  }
  MatrixXd dA(const MatrixXd& X, const MatrixXd& G) const {
    return s * B.transpose() * c().asDiagonal() * G * X.transpose();
  }
  MatrixXd dB(const MatrixXd& X, const MatrixXd& G) const {
    return s * c().asDiagonal() * G * (A * X).transpose();
  }
  MatrixXd dX(const MatrixXd& G) const { return W().transpose() * (c().asDiagonal() * G); }
};

template <typename Case>
class Conformance : public ::testing::Test {
 protected:
  using C = typename Case::Config;
  using T = typename Case::T;
  using Layer = typename Case::Layer;
  using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  using Vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;

  static constexpr Eigen::Index d = 7, k = 5, r = 2, n = 4;

  void SetUp() override {
    if (!C::available()) GTEST_SKIP() << "this back end is not available on this machine";
    W0 = random(d, k, 1);
    b = random(d, 1, 2).col(0);
    X = random(k, n, 3);
    R = random(d, n, 4);  // L = sum(R .* H), so G = dL/dH = R
    cfg.rank = static_cast<int>(r);
    cfg.alpha = 3.0;  // s = 1.5
    cfg.seed = 5;
  }

  /// A layer whose adapter has random A and B (so the adapter term matters).
  Layer make() const {
    Layer l = Case::make(W0, b, cfg);
    Case::adapter(l).B() = random(d, r, 6).template cast<T>();
    return l;
  }

  static MatrixXd dbl(const Mat& m) { return m.template cast<double>(); }

  /// A layer whose DoRA adapter has random B and a magnitude 20 % off the row norms of W0.
  Layer make_dora() const {
    auto dora = cfg;
    dora.use_dora = true;
    Layer l = Case::make(W0, b, dora);
    auto& a = Case::adapter(l);
    a.B() = random(d, r, 6, 0.5).template cast<T>();
    a.magnitude().array() *= (1.0 + 0.2 * random(d, 1, 8).array()).template cast<T>();
    return l;
  }

  DoraReference dora_reference(Layer& l) const {
    const auto& a = Case::adapter(l);
    return {dbl(l.weight()),    dbl(a.A()), dbl(a.B()), a.magnitude().template cast<double>(), b,
            double(a.scaling())};
  }

  /// The dense reference of the active adapter: Wq X + b + s B A X (+ s b_B), in double.
  MatrixXd reference_forward(Layer& l, const MatrixXd& Xin) const {
    const auto& a = Case::adapter(l);
    MatrixXd H = dbl(l.weight()) * Xin + double(a.scaling()) * dbl(a.B()) * (dbl(a.A()) * Xin);
    H.colwise() += b;
    if (a.has_lora_bias())
      H.colwise() += double(a.scaling()) * a.lora_bias().template cast<double>();
    return H;
  }

  MatrixXd W0, X, R;
  VectorXd b;
  lora::LoRAConfig cfg;
};

TYPED_TEST_SUITE(Conformance, Storages, Names);

// ---- products
// -------------------------------------------------------------------------------------

TYPED_TEST(Conformance, ForwardMatchesDenseComputation) {
  using C = typename TestFixture::C;
  auto layer = this->make();
  const MatrixXd X = this->X;
  EXPECT_MATRIX_NEAR(layer.forward(X.template cast<typename TestFixture::T>()),
                     this->reference_forward(layer, X), C::kProductTol);
  layer.eval();
  EXPECT_MATRIX_NEAR(layer.forward(X.template cast<typename TestFixture::T>()),
                     this->reference_forward(layer, X), C::kProductTol);
}

TYPED_TEST(Conformance, GradientsMatchFiniteDifferencesAndDenseComputation) {
  using T = typename TestFixture::T;
  using Mat = typename TestFixture::Mat;
  using C = typename TestFixture::C;
  using Case = TypeParam;
  auto layer = this->make();
  Case::adapter(layer).set_lora_bias(random(this->d, 1, 7).template cast<T>());
  const Mat X = this->X.template cast<T>(), G = this->R.template cast<T>();
  layer.zero_grad();
  const Mat dX = layer.backward(X, G);
  auto& a = Case::adapter(layer);

  // L = sum(R .* H) is linear in A, in B and in b_B separately, so a central difference is exact
  // up to rounding whatever the step: a step of 0.5 keeps rounding far below the signal.
  auto loss = [&] {
    return (layer.forward(X).template cast<double>().array() * this->R.array()).sum();
  };
  const double tol = std::is_same_v<T, float> ? 2e-3 : 1e-9;
  auto fd = [&](auto& p) {
    Eigen::MatrixXd g(p.rows(), p.cols());
    for (Eigen::Index j = 0; j < p.cols(); ++j)
      for (Eigen::Index i = 0; i < p.rows(); ++i) {
        const T saved = p(i, j);
        p(i, j) = saved + T(0.5);
        const double up = loss();
        p(i, j) = saved - T(0.5);
        const double down = loss();
        p(i, j) = saved;
        g(i, j) = up - down;
      }
    return g;
  };
  EXPECT_MATRIX_NEAR(a.grad_A(), fd(a.A()), tol);
  EXPECT_MATRIX_NEAR(a.grad_B(), fd(a.B()), tol);
  EXPECT_MATRIX_NEAR(a.grad_lora_bias(), fd(a.lora_bias()), tol);

  // dX = Wq^T G + s A^T (B^T G), against the dense computation on the weight as stored...
  const MatrixXd dX_ref =
      this->dbl(layer.weight()).transpose() * this->R +
      double(a.scaling()) * this->dbl(a.A()).transpose() * (this->dbl(a.B()).transpose() * this->R);
  EXPECT_MATRIX_NEAR(dX, dX_ref, C::kProductTol);
  // ...and, where the product does not round its input, against finite differences in X.
  if constexpr (C::kExactProducts) {
    Mat Xp = X;
    Eigen::MatrixXd g(Xp.rows(), Xp.cols());
    for (Eigen::Index j = 0; j < Xp.cols(); ++j)
      for (Eigen::Index i = 0; i < Xp.rows(); ++i) {
        const T saved = Xp(i, j);
        Xp(i, j) = saved + T(0.5);
        const double up =
            (layer.forward(Xp).template cast<double>().array() * this->R.array()).sum();
        Xp(i, j) = saved - T(0.5);
        const double down =
            (layer.forward(Xp).template cast<double>().array() * this->R.array()).sum();
        Xp(i, j) = saved;
        g(i, j) = up - down;
      }
    EXPECT_MATRIX_NEAR(dX, g, tol);
  }

  // backward_without_input_grad accumulates the same gradients.
  const Mat gA = a.grad_A(), gB = a.grad_B();
  layer.zero_grad();
  layer.backward_without_input_grad(X, G);
  EXPECT_MATRIX_NEAR(a.grad_A(), gA, 1e-6);
  EXPECT_MATRIX_NEAR(a.grad_B(), gB, 1e-6);
}

TYPED_TEST(Conformance, DropoutForwardAndBackwardUseTheSameMask) {
  using T = typename TestFixture::T;
  using Mat = typename TestFixture::Mat;
  using C = typename TestFixture::C;
  using Case = TypeParam;
  auto cfg = this->cfg;
  cfg.dropout = 0.4;
  typename TestFixture::Layer layer = Case::make(this->W0, this->b, cfg);
  auto& a = Case::adapter(layer);
  a.B() = random(this->d, this->r, 6).template cast<T>();
  const Mat X = this->X.template cast<T>(), G = this->R.template cast<T>();
  const Mat H = layer.forward(X);
  const MatrixXd M = layer.dropout_mask().template cast<double>();
  ASSERT_EQ(M.rows(), this->k);
  EXPECT_TRUE((M.array() == 0).any()) << "no element dropped: the test would be empty";
  const MatrixXd Xm = this->X.cwiseProduct(M);
  const double s = a.scaling();
  const MatrixXd Wq = this->dbl(layer.weight());
  MatrixXd H_ref = Wq * this->X + s * this->dbl(a.B()) * (this->dbl(a.A()) * Xm);
  H_ref.colwise() += this->b;
  EXPECT_MATRIX_NEAR(H, H_ref, C::kProductTol);
  layer.zero_grad();
  const Mat dX = layer.backward(X, G);
  EXPECT_MATRIX_NEAR(a.grad_A(), s * (this->dbl(a.B()).transpose() * this->R) * Xm.transpose(),
                     1e-5);
  EXPECT_MATRIX_NEAR(a.grad_B(), s * this->R * (this->dbl(a.A()) * Xm).transpose(), 1e-5);
  const MatrixXd dX_ref =
      Wq.transpose() * this->R +
      M.cwiseProduct(s * this->dbl(a.A()).transpose() * (this->dbl(a.B()).transpose() * this->R));
  EXPECT_MATRIX_NEAR(dX, dX_ref, C::kProductTol);
  layer.eval();  // no mask in evaluation mode
  MatrixXd H_eval = Wq * this->X + s * this->dbl(a.B()) * (this->dbl(a.A()) * this->X);
  H_eval.colwise() += this->b;
  EXPECT_MATRIX_NEAR(layer.forward(X), H_eval, C::kProductTol);
}

// ---- mixed batches (the multi-adapter face)
// -------------------------------------------------------

TYPED_TEST(Conformance, MixedBatchesMatchEachGroupRunAlone) {
  using Case = TypeParam;
  if constexpr (!Case::kMulti) {
    GTEST_SKIP() << "mixed batches are the multi-adapter face's";
  } else {
    using T = typename TestFixture::T;
    using Mat = typename TestFixture::Mat;
    using C = typename TestFixture::C;
    auto layer = this->make();  // adapters "other" (0) and "task" (1)
    auto cfg3 = this->cfg;
    cfg3.rank = 1;
    cfg3.alpha = 5;
    cfg3.seed = 11;
    layer.add_adapter("third", cfg3).B() = random(this->d, 1, 12).template cast<T>();
    layer.adapter("third").set_lora_bias(random(this->d, 1, 13).template cast<T>());
    const Eigen::Index n = 7;
    const MatrixXd Xd = random(this->k, n, 14), Gd = random(this->d, n, 15);
    const Mat X = Xd.template cast<T>(), G = Gd.template cast<T>();
    const std::vector<int> which = {1, 2, Case::Layer::kNoAdapter, 0, 1, 2, 1};

    // Forward: column j as the dense layer with adapter which[j] (or none).
    const MatrixXd Wq = this->dbl(layer.weight());
    MatrixXd H_ref = Wq * Xd;
    H_ref.colwise() += this->b;
    const std::vector<std::string> names = layer.adapter_names();
    for (Eigen::Index j = 0; j < n; ++j) {
      if (which[j] < 0) continue;
      const auto& a = std::as_const(layer).adapter(names[which[j]]);
      H_ref.col(j) += double(a.scaling()) * this->dbl(a.B()) * (this->dbl(a.A()) * Xd.col(j));
      if (a.has_lora_bias())
        H_ref.col(j) += double(a.scaling()) * a.lora_bias().template cast<double>();
    }
    EXPECT_MATRIX_NEAR(layer.forward_mixed(X, which), H_ref, C::kProductTol);

    // Backward: each adapter's gradients equal a backward over its columns alone.
    layer.zero_grad();
    const Mat dX = layer.backward_mixed(X, which, G);
    MatrixXd dX_ref = Wq.transpose() * Gd;
    for (int a = 0; a < 3; ++a) {
      auto alone = layer;  // a copy, with its own adapters
      alone.zero_grad();
      alone.set_active(names[a]);
      std::vector<Eigen::Index> cols;
      for (Eigen::Index j = 0; j < n; ++j)
        if (which[j] == a) cols.push_back(j);
      Mat Xa(this->k, cols.size()), Ga(this->d, cols.size());
      for (std::size_t c = 0; c < cols.size(); ++c) {
        Xa.col(c) = X.col(cols[c]);
        Ga.col(c) = G.col(cols[c]);
      }
      alone.backward(Xa, Ga);
      const auto& mine = std::as_const(layer).adapter(names[a]);
      const auto& ref = std::as_const(alone).adapter(names[a]);
      EXPECT_MATRIX_NEAR(mine.grad_A(), ref.grad_A(), 1e-5) << names[a];
      EXPECT_MATRIX_NEAR(mine.grad_B(), ref.grad_B(), 1e-5) << names[a];
      if (ref.has_lora_bias()) {
        EXPECT_MATRIX_NEAR(mine.grad_lora_bias(), ref.grad_lora_bias(), 1e-5) << names[a];
      }
      for (Eigen::Index j : cols)
        dX_ref.col(j) += double(mine.scaling()) * this->dbl(mine.A()).transpose() *
                         (this->dbl(mine.B()).transpose() * Gd.col(j));
    }
    EXPECT_MATRIX_NEAR(dX, dX_ref, C::kProductTol);

    // Finite differences of L = sum(G .* forward_mixed) in the third adapter's A and lora bias.
    auto& third = layer.adapter("third");
    auto loss = [&] {
      return (layer.forward_mixed(X, which).template cast<double>().array() * Gd.array()).sum();
    };
    auto fd = [&](auto& p) {
      Eigen::MatrixXd g(p.rows(), p.cols());
      for (Eigen::Index j = 0; j < p.cols(); ++j)
        for (Eigen::Index i = 0; i < p.rows(); ++i) {
          const T saved = p(i, j);
          p(i, j) = saved + T(0.5);
          const double up = loss();
          p(i, j) = saved - T(0.5);
          const double down = loss();
          p(i, j) = saved;
          g(i, j) = up - down;
        }
      return g;
    };
    const double tol = std::is_same_v<T, float> ? 2e-3 : 1e-9;
    EXPECT_MATRIX_NEAR(third.grad_A(), fd(third.A()), tol);
    EXPECT_MATRIX_NEAR(third.grad_lora_bias(), fd(third.lora_bias()), tol);
  }
}

TYPED_TEST(Conformance, MixedBatchesWithDropoutUseEachColumnsMask) {
  using Case = TypeParam;
  if constexpr (!Case::kMulti) {
    GTEST_SKIP() << "mixed batches are the multi-adapter face's";
  } else {
    using T = typename TestFixture::T;
    using Mat = typename TestFixture::Mat;
    using C = typename TestFixture::C;
    auto cfg = this->cfg;
    cfg.dropout = 0.5;
    typename Case::Layer layer(C::make(this->W0), this->b.template cast<T>());
    layer.add_adapter("p", cfg).B() = random(this->d, this->r, 21).template cast<T>();
    cfg.dropout = 0;
    cfg.seed = 9;
    layer.add_adapter("q", cfg).B() = random(this->d, this->r, 22).template cast<T>();
    const Eigen::Index n = 6;
    const MatrixXd Xd = random(this->k, n, 23), Gd = random(this->d, n, 24);
    const std::vector<int> which = {0, 1, 0, Case::Layer::kNoAdapter, 0, 1};
    const Mat H = layer.forward_mixed(Xd.template cast<T>(), which);
    const MatrixXd M = layer.dropout_mask().template cast<double>();
    EXPECT_TRUE((M.col(0).array() == 0).any() || (M.col(2).array() == 0).any());
    EXPECT_TRUE((M.col(1).array() == 1).all() && (M.col(3).array() == 1).all());  // p = 0 there
    layer.zero_grad();
    const Mat dX = layer.backward_mixed(Xd.template cast<T>(), which, Gd.template cast<T>());
    const auto& p = std::as_const(layer).adapter("p");
    const double s = p.scaling();
    MatrixXd gA = MatrixXd::Zero(this->r, this->k);
    MatrixXd H_ref = this->dbl(layer.weight()) * Xd;
    H_ref.colwise() += this->b;
    for (Eigen::Index j : {0, 2, 4}) {
      const VectorXd xm = Xd.col(j).cwiseProduct(M.col(j));
      H_ref.col(j) += s * this->dbl(p.B()) * (this->dbl(p.A()) * xm);
      gA += s * (this->dbl(p.B()).transpose() * Gd.col(j)) * xm.transpose();
    }
    const auto& q = std::as_const(layer).adapter("q");
    for (Eigen::Index j : {1, 5})
      H_ref.col(j) += double(q.scaling()) * this->dbl(q.B()) * (this->dbl(q.A()) * Xd.col(j));
    EXPECT_MATRIX_NEAR(H, H_ref, C::kProductTol);
    EXPECT_MATRIX_NEAR(p.grad_A(), gA, 1e-5);
    EXPECT_EQ(dX.cols(), n);
  }
}

// ---- PEFT parity
// ----------------------------------------------------------------------------------

TYPED_TEST(Conformance, MatchesPeftOnItsOwnNumbers) {
  using T = typename TestFixture::T;
  using Mat = typename TestFixture::Mat;
  using C = typename TestFixture::C;
  using Case = TypeParam;
  for (const char* name : {"f64_basic", "f64_rslora", "f64_bias", "f64_rank1", "f32_wide"}) {
    SCOPED_TRACE(name);
    const auto st =
        lora::io::SafeTensors::load(fixture_path(std::string("peft/") + name + ".safetensors"));
    std::ifstream meta_file(fixture_path(std::string("peft/") + name + ".json"));
    const auto meta = nlohmann::json::parse(meta_file);
    lora::LoRAConfig cfg;
    cfg.rank = meta["r"].get<int>();
    cfg.alpha = meta["lora_alpha"].get<double>();
    cfg.use_rslora = meta["use_rslora"].get<bool>();
    const MatrixXd W0 = st.matrix<double>("W0");
    const VectorXd bias =
        meta["bias"].get<bool>() ? st.vector<double>("bias") : VectorXd::Zero(W0.rows()).eval();
    auto layer = Case::make(W0, bias, cfg);
    Case::adapter(layer).set_weights(st.matrix<T>("A"), st.matrix<T>("B"));
    // The adapter's gradients never touch W0: every storage matches PEFT to T's precision. What
    // passes through W0 carries the storage's own error (bf16: about 2^-8) on top.
    const double exact = std::is_same_v<T, float> || name[1] == '3' ? 1e-5 : 1e-12;
    const double through_w0 = std::max({exact, C::kProductTol, C::kRepresentationTol});
    const Mat X = st.matrix<T>("x").transpose(), G = st.matrix<T>("G").transpose();
    EXPECT_MATRIX_NEAR(layer.forward(X), st.matrix<double>("y").transpose(), through_w0);
    const Mat dX = layer.backward(X, G);
    EXPECT_MATRIX_NEAR(dX, st.matrix<double>("dx").transpose(), through_w0);
    EXPECT_MATRIX_NEAR(Case::adapter(layer).grad_A(), st.matrix<double>("dA"), exact);
    EXPECT_MATRIX_NEAR(Case::adapter(layer).grad_B(), st.matrix<double>("dB"), exact);
    layer.merge();
    EXPECT_MATRIX_NEAR(layer.weight(), st.matrix<double>("W_merged"),
                       std::max({exact, 2 * C::kUnit, C::kRepresentationTol}));
    EXPECT_MATRIX_NEAR(layer.forward(X), st.matrix<double>("y_merged").transpose(), through_w0);
  }
}

// ---- merge
// ----------------------------------------------------------------------------------------

TYPED_TEST(Conformance, MergeFoldsTheAdapterAndUnmergeGivesW0Back) {
  using Mat = typename TestFixture::Mat;
  using C = typename TestFixture::C;
  using T = typename TestFixture::T;
  auto layer = this->make();
  const Mat W_before = layer.weight();
  const Mat X = this->X.template cast<T>();
  const Mat H_unmerged = layer.forward(X);
  layer.merge();
  EXPECT_TRUE(layer.is_merged());
  const auto& a = TypeParam::adapter(layer);
  const MatrixXd merged_ref =
      this->dbl(W_before) + double(a.scaling()) * this->dbl(a.B()) * this->dbl(a.A());
  EXPECT_MATRIX_NEAR(layer.weight(), merged_ref, 2 * C::kUnit);
  EXPECT_MATRIX_NEAR(layer.forward(X), H_unmerged, 2 * C::kProductTol + 2 * C::kUnit);
  layer.unmerge();
  EXPECT_FALSE(layer.is_merged());
  if (C::kMode == MergeMode::ExactRestore) {
    EXPECT_TRUE(bit_equal(layer.weight(), W_before));
  } else {
    const MatrixXd bound =
        2 * C::kUnit *
        (this->dbl(W_before).cwiseAbs() + (merged_ref - this->dbl(W_before)).cwiseAbs());
    EXPECT_TRUE(((this->dbl(layer.weight()) - this->dbl(W_before)).cwiseAbs().array() <=
                 bound.array() + 1e-300)
                    .all());
  }
}

TYPED_TEST(Conformance, AnOverflowingMergeIsRefusedAndLeavesTheWeightUntouched) {
  using Mat = typename TestFixture::Mat;
  using T = typename TestFixture::T;
  using C = typename TestFixture::C;
  MatrixXd W0 = this->W0;
  W0(2, 3) = C::kHuge;
  auto cfg = this->cfg;
  cfg.rank = 1;
  cfg.alpha = 1;  // s = 1
  auto layer = TypeParam::make(W0, this->b, cfg);
  auto& a = TypeParam::adapter(layer);
  a.A().setZero();
  a.B().setZero();
  // W(2, 3) = kHuge + 2 * max(kHuge / 2, 0.75 max) > max: finite W0, infinite merged weight.
  a.A()(0, 3) = T(std::max(C::kHuge / 2, 0.75 * double(std::numeric_limits<T>::max())));
  a.B()(2, 0) = T(2);
  const Mat before = layer.weight();
  EXPECT_THROW(layer.merge(), std::domain_error);
  EXPECT_FALSE(layer.is_merged());
  EXPECT_TRUE(bit_equal(layer.weight(), before));
  // Still usable: a harmless adapter merges.
  a.A()(0, 3) = T(0);
  EXPECT_NO_THROW(layer.merge());
}

TYPED_TEST(Conformance, ThousandMergeCyclesStayExactOrWithinTheDocumentedBound) {
  using Mat = typename TestFixture::Mat;
  using C = typename TestFixture::C;
  auto layer = this->make();
  const Mat W_before = layer.weight();
  const auto& a = TypeParam::adapter(layer);
  const MatrixXd delta = double(a.scaling()) * this->dbl(a.B()) * this->dbl(a.A());
  const int cycles = 1000;
  for (int c = 0; c < cycles; ++c) {
    layer.merge();
    layer.unmerge();
  }
  if (C::kMode == MergeMode::ExactRestore) {
    EXPECT_TRUE(bit_equal(layer.weight(), W_before));
  } else {
    // After c cycles |W - W0| <= c * 2u * (|W0| + |s B A|) elementwise (u of the stored type).
    const MatrixXd bound =
        cycles * 2 * C::kUnit * (this->dbl(W_before).cwiseAbs() + delta.cwiseAbs());
    EXPECT_TRUE(
        ((this->dbl(layer.weight()) - this->dbl(W_before)).cwiseAbs().array() <= bound.array())
            .all());
  }
}

// The three ways an adapter used to change under a merged weight (an optimizer step, a held
// reference to A, the reference add_adapter returns): unmerge must still give W0 back, and a
// merged forward must refuse to serve the stale merge.
TYPED_TEST(Conformance, ChangingAMergedAdapterCannotCorruptW0) {
  using Mat = typename TestFixture::Mat;
  using T = typename TestFixture::T;
  using C = typename TestFixture::C;
  const Mat X = this->X.template cast<T>(), G = this->R.template cast<T>();
  for (int sequence = 0; sequence < 3; ++sequence) {
    SCOPED_TRACE(sequence);
    auto layer = this->make();
    const Mat W0 = layer.weight();
    auto& a = TypeParam::adapter(layer);
    const MatrixXd delta = double(a.scaling()) * this->dbl(a.B()) * this->dbl(a.A());
    lora::SGD<T> opt(TypeParam::parameters(layer), {20.0});  // a huge step: moves A and B by ~20
    layer.forward(X);
    layer.backward(X, G);
    Mat& held_A = a.A();
    layer.merge();  // to evaluate
    if (sequence == 0) opt.step();
    if (sequence == 1) held_A.array() += T(20);
    if (sequence == 2) a.B().array() += T(20);  // what add_adapter's reference allows
    EXPECT_THROW(layer.forward(X), std::logic_error);
    layer.unmerge();
    if (C::kMode == MergeMode::ExactRestore) {
      EXPECT_TRUE(bit_equal(layer.weight(), W0));
    } else {
      const MatrixXd bound = 2 * C::kUnit * (this->dbl(W0).cwiseAbs() + delta.cwiseAbs());
      EXPECT_TRUE(
          ((this->dbl(layer.weight()) - this->dbl(W0)).cwiseAbs().array() <= bound.array()).all())
          << "max |W - W0| = " << (this->dbl(layer.weight()) - this->dbl(W0)).cwiseAbs().maxCoeff();
    }
    EXPECT_NO_THROW(layer.forward(X));  // unmerged: the current adapter, no refusal
  }
}

// ---- parameters
// -----------------------------------------------------------------------------------

TYPED_TEST(Conformance, ParameterViewsFollowTheAdapterOrFailClearly) {
  using Mat = typename TestFixture::Mat;
  using T = typename TestFixture::T;
  using Case = TypeParam;
  auto layer = std::make_unique<typename Case::Layer>(this->make());
  Case::adapter(*layer).set_lora_bias(random(this->d, 1, 31).template cast<T>());
  auto params = Case::parameters(*layer);
  ASSERT_EQ(params.size(), 3u);  // A, B and the lora bias
  lora::SGD<T> opt(params, {0.5});
  const Mat X = this->X.template cast<T>(), G = this->R.template cast<T>();
  layer->backward(X, G);

  // Replacing the adapter with one of the same shapes copies into the existing storage: the
  // optimizer keeps training what the layer uses.
  lora::LoRAAdapter<T> same(this->d, this->k, this->cfg);
  same.set_lora_bias(random(this->d, 1, 32).template cast<T>());
  if constexpr (Case::kMulti) {
    layer->replace_adapter("task", same);
  } else {
    layer->replace_adapter(same);
  }
  auto& a = Case::adapter(*layer);
  a.grad_A().setOnes();
  a.grad_B().setZero();
  a.grad_lora_bias().setZero();
  const Mat A_before = a.A();
  opt.step();
  EXPECT_MATRIX_NEAR(a.A(), (A_before.array() - T(0.5)).matrix(), 1e-6);

  // Moving the layer keeps the views.
  auto moved = std::make_unique<typename Case::Layer>(std::move(*layer));
  layer.reset();
  EXPECT_NO_THROW(opt.step());
  EXPECT_MATRIX_NEAR(Case::adapter(*moved).A(), (A_before.array() - T(1.0)).matrix(), 1e-6);

  // Another rank reallocates: the old views are stale, and the optimizer says so (this was a
  // heap-use-after-free under ASan).
  auto cfg4 = this->cfg;
  cfg4.rank = 3;
  if constexpr (Case::kMulti) {
    moved->replace_adapter("task", lora::LoRAAdapter<T>(this->d, this->k, cfg4));
  } else {
    moved->replace_adapter(lora::LoRAAdapter<T>(this->d, this->k, cfg4));
  }
  try {
    opt.step();
    FAIL() << "expected std::logic_error";
  } catch (const std::logic_error& e) {
    EXPECT_NE(std::string(e.what()).find("stale"), std::string::npos) << e.what();
  }
  // So are views of a destroyed layer.
  auto fresh = Case::parameters(*moved);
  lora::SGD<T> opt2(fresh, {0.5});
  moved.reset();
  EXPECT_THROW(opt2.step(), std::logic_error);
}

// ---- DoRA: the same battery for a DoRA adapter (docs/dora.md) -----------------------------------

TYPED_TEST(Conformance, DoraForwardAndGradientsMatchTheDenseComputationAndFiniteDifferences) {
  using T = typename TestFixture::T;
  using Mat = typename TestFixture::Mat;
  using C = typename TestFixture::C;
  using Case = TypeParam;
  auto layer = this->make_dora();
  auto& a = Case::adapter(layer);
  const DoraReference ref = this->dora_reference(layer);
  const Mat X = this->X.template cast<T>(), G = this->R.template cast<T>();
  EXPECT_MATRIX_NEAR(layer.forward(X), ref.forward(this->X), C::kProductTol);
  layer.zero_grad();
  const Mat dX = layer.backward(X, G);  // from the forward's tape
  EXPECT_MATRIX_NEAR(dX, ref.dX(this->R), C::kProductTol);
  EXPECT_MATRIX_NEAR(a.grad_A(), ref.dA(this->X, this->R), C::kProductTol);
  EXPECT_MATRIX_NEAR(a.grad_B(), ref.dB(this->X, this->R), C::kProductTol);

  // L = sum(R .* H) is linear in m and in X: central differences with a step of 0.5 are exact
  // up to rounding.
  auto loss = [&](const Mat& Xin) {
    return (layer.forward(Xin).template cast<double>().array() * this->R.array()).sum();
  };
  const double tol = std::is_same_v<T, float> ? 2e-3 : 1e-9;
  const Eigen::VectorXd dm = a.grad_magnitude().template cast<double>();
  Eigen::VectorXd fd_m(this->d);
  for (Eigen::Index i = 0; i < this->d; ++i) {
    const T saved = a.magnitude()(i);
    a.magnitude()(i) = saved + T(0.5);
    const double up = loss(X);
    a.magnitude()(i) = saved - T(0.5);
    const double down = loss(X);
    a.magnitude()(i) = saved;
    fd_m(i) = up - down;
  }
  EXPECT_MATRIX_NEAR(dm, fd_m, std::max(tol, C::kProductTol));
  if constexpr (C::kExactProducts) {
    Mat Xp = X;
    Eigen::MatrixXd g(Xp.rows(), Xp.cols());
    for (Eigen::Index j = 0; j < Xp.cols(); ++j)
      for (Eigen::Index i = 0; i < Xp.rows(); ++i) {
        const T saved = Xp(i, j);
        Xp(i, j) = saved + T(0.5);
        const double up = loss(Xp);
        Xp(i, j) = saved - T(0.5);
        const double down = loss(Xp);
        Xp(i, j) = saved;
        g(i, j) = up - down;
      }
    EXPECT_MATRIX_NEAR(dX, g, tol);
  }

  // A backward with no matching forward (the finite differences ran forwards since) recomputes
  // and accumulates the same gradients.
  layer.zero_grad();
  layer.backward_without_input_grad(X, G);
  EXPECT_MATRIX_NEAR(a.grad_magnitude(), dm, 1e-5);
  EXPECT_MATRIX_NEAR(a.grad_A(), ref.dA(this->X, this->R), C::kProductTol);
}

TYPED_TEST(Conformance, DoraMatchesPeftOnItsOwnNumbers) {
  using T = typename TestFixture::T;
  using Mat = typename TestFixture::Mat;
  using C = typename TestFixture::C;
  using Case = TypeParam;
  for (const char* name :
       {"dora_f64_basic", "dora_f64_rslora_bias", "dora_f64_rank1", "dora_f32_wide"}) {
    SCOPED_TRACE(name);
    const auto st = lora::io::SafeTensors::load(
        fixture_path(std::string("peft-dora/") + name + ".safetensors"));
    std::ifstream meta_file(fixture_path(std::string("peft-dora/") + name + ".json"));
    const auto meta = nlohmann::json::parse(meta_file);
    lora::LoRAConfig cfg;
    cfg.rank = meta["r"].get<int>();
    cfg.alpha = meta["lora_alpha"].get<double>();
    cfg.use_rslora = meta["use_rslora"].get<bool>();
    cfg.use_dora = true;
    const MatrixXd W0 = st.matrix<double>("W0");
    const VectorXd bias =
        meta["bias"].get<bool>() ? st.vector<double>("bias") : VectorXd::Zero(W0.rows()).eval();
    auto layer = Case::make(W0, bias, cfg);
    auto& a = Case::adapter(layer);
    a.set_weights(st.matrix<T>("A"), st.matrix<T>("B"));
    a.set_magnitude(st.vector<T>("m"));
    // Everything DoRA computes passes through W0 (its norms scale every term): the storage's own
    // error, and how far its representation of W0 is from PEFT's, carry into all of it.
    const bool single = std::is_same_v<T, float> || meta["dtype"] == "torch.float32";
    const double tol = std::max({single ? 2e-5 : 1e-12, C::kProductTol, C::kRepresentationTol});
    const Mat X = st.matrix<T>("x").transpose(), G = st.matrix<T>("G").transpose();
    EXPECT_MATRIX_NEAR(layer.forward(X), st.matrix<double>("y").transpose(), tol);
    layer.zero_grad();
    EXPECT_MATRIX_NEAR(layer.backward(X, G), st.matrix<double>("dx").transpose(), tol);
    EXPECT_MATRIX_NEAR(a.grad_A(), st.matrix<double>("dA"), tol);
    EXPECT_MATRIX_NEAR(a.grad_B(), st.matrix<double>("dB"), tol);
    EXPECT_MATRIX_NEAR(a.grad_magnitude(), st.vector<double>("dm"), tol);
    const Mat W_before = layer.weight();
    layer.merge();
    EXPECT_MATRIX_NEAR(layer.weight(), st.matrix<double>("W_merged"), std::max(tol, 2 * C::kUnit));
    EXPECT_MATRIX_NEAR(layer.forward(X), st.matrix<double>("y_merged").transpose(),
                       std::max(tol, 2 * C::kUnit));
    layer.unmerge();
    if (C::kMode == MergeMode::ExactRestore) {
      EXPECT_TRUE(bit_equal(layer.weight(), W_before));
    } else {
      // PEFT's unmerge, W0 = W' ||W|| / m - s B A, rounds like ours: within 4u (|W0| + |s B A|)
      // elementwise of the weight as stored (u of the stored type; g = m / ||W|| is near 1).
      const MatrixXd delta = double(a.scaling()) * this->dbl(a.B()) * this->dbl(a.A());
      const MatrixXd bound = 4 * C::kUnit * (this->dbl(W_before).cwiseAbs() + delta.cwiseAbs()) +
                             MatrixXd::Constant(W0.rows(), W0.cols(), single ? 1e-7 : 1e-16);
      EXPECT_TRUE(
          ((this->dbl(layer.weight()) - this->dbl(W_before)).cwiseAbs().array() <= bound.array())
              .all());
    }
    if (C::kUnit < 1e-6 && C::kRepresentationTol == 0) {  // and PEFT's own, where W0 is exact
      EXPECT_MATRIX_NEAR(layer.weight(), st.matrix<double>("W_unmerged"), tol);
    }
  }
}

TYPED_TEST(Conformance, DoraMergeScalesTheRowsAndUnmergeGivesW0Back) {
  using Mat = typename TestFixture::Mat;
  using C = typename TestFixture::C;
  using T = typename TestFixture::T;
  using Case = TypeParam;
  auto layer = this->make_dora();
  const Mat W_before = layer.weight();
  const DoraReference ref = this->dora_reference(layer);
  const Mat X = this->X.template cast<T>();
  layer.eval();
  const Mat H_unmerged = layer.forward(X);
  const int cycles = 100;
  for (int c = 0; c < cycles; ++c) {
    layer.merge();
    if (c == 0) {
      EXPECT_MATRIX_NEAR(layer.weight(), ref.c().asDiagonal() * ref.W(),
                         std::max(4 * C::kUnit, C::kProductTol));
      EXPECT_MATRIX_NEAR(layer.forward(X), H_unmerged, 2 * C::kProductTol + 4 * C::kUnit);
      Case::adapter(layer).magnitude()(0) += T(1);  // a changed magnitude is a stale merge
      EXPECT_THROW(layer.forward(X), std::logic_error);
      Case::adapter(layer).magnitude()(0) -= T(1);
    }
    layer.unmerge();
  }
  if (C::kMode == MergeMode::ExactRestore) {
    EXPECT_TRUE(bit_equal(layer.weight(), W_before));
  } else {
    // Each cycle rounds W0 + s B A, its row scaling, the division and the subtraction: within
    // 4u (|W0| + |s B A|) elementwise (u of the stored type; g is near 1 here).
    const MatrixXd delta = ref.s * ref.B * ref.A;
    const MatrixXd bound =
        cycles * 4 * C::kUnit * (this->dbl(W_before).cwiseAbs() + delta.cwiseAbs());
    EXPECT_TRUE(
        ((this->dbl(layer.weight()) - this->dbl(W_before)).cwiseAbs().array() <= bound.array())
            .all())
        << "max |W - W0| = "
        << (this->dbl(layer.weight()) - this->dbl(W_before)).cwiseAbs().maxCoeff();
  }
}

/// Runs the out-parameter API (forward, backward, backward_without_input_grad; with
/// `eval_forward` an evaluation-mode forward too; mixed batches on the multi face) twice on `layer`
/// and expects the second round to allocate nothing. Skips where allocations are not counted or
/// the storage does not promise allocation-free products.
template <typename Case, typename Layer>
void expect_steady_state_allocation_free(Layer& layer, Eigen::Index k, Eigen::Index d,
                                         bool eval_forward) {
  using T = typename Case::T;
  using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  if (!lora::test::allocation_counter_available())
    GTEST_SKIP() << "allocations are not counted in sanitizer builds";
  if (!layer.frozen().allocation_free())
    GTEST_SKIP() << "this storage does not promise allocation-free products";
  const Mat X = random(k, 64, 51).template cast<T>(), G = random(d, 64, 52).template cast<T>();
  Mat H(d, 64), dX(k, 64);
  typename Layer::WorkspaceType ws;
  std::vector<int> which(64);
  for (int j = 0; j < 64; ++j) which[j] = j % 3 == 2 ? -1 : j % 2;  // -1: kNoAdapter
  auto round = [&] {
    layer.forward(X, H, ws);
    layer.backward(X, G, dX, ws);
    layer.backward_without_input_grad(X, G, ws);
    if (eval_forward) {
      layer.eval();
      layer.forward(X, H, ws);
      layer.train();
    }
    if constexpr (Case::kMulti) {
      layer.forward_mixed(X, which, H, ws);
      layer.backward_mixed(X, which, G, dX, ws);
    }
  };
  round();  // the workspace, any DoRA tape and the kernels' buffers grow here
  const auto before = lora::test::allocation_count();
  round();
  EXPECT_EQ(lora::test::allocation_count() - before, 0u);
}

TYPED_TEST(Conformance, DoraAllocatesNothingInSteadyState) {
  auto layer = this->make_dora();
  expect_steady_state_allocation_free<TypeParam>(layer, this->k, this->d, true);
}

// ---- threads
// --------------------------------------------------------------------------------------

TYPED_TEST(Conformance, EightThreadsOfConstForwardEqualOne) {
  using Mat = typename TestFixture::Mat;
  using T = typename TestFixture::T;
  auto layer = this->make();
  layer.eval();
  const Mat X = random(this->k, 33, 41).template cast<T>();
  for (int merged = 0; merged < 2; ++merged) {
    if (merged) layer.merge();
    const auto& shared = layer;
    const Mat one = shared.forward(X);
    std::vector<Mat> out(8);
    std::vector<std::thread> threads;
    for (int t = 0; t < 8; ++t)
      threads.emplace_back([&, t] {
        typename TestFixture::Layer::WorkspaceType ws;
        Mat H(shared.out_features(), X.cols());
        for (int rep = 0; rep < 20; ++rep) shared.forward(X, H, ws);
        out[t] = H;
      });
    for (auto& th : threads) th.join();
    for (int t = 0; t < 8; ++t) EXPECT_TRUE(bit_equal(out[t], one)) << "thread " << t;
  }
}

// ---- allocations
// ----------------------------------------------------------------------------------

TYPED_TEST(Conformance, OutParameterApiAllocatesNothingInSteadyState) {
  auto layer = this->make();
  expect_steady_state_allocation_free<TypeParam>(layer, this->k, this->d, false);
}

}  // namespace
}  // namespace test_conformance
