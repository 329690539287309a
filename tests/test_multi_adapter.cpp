// Many adapters on one frozen base: switching (W0 untouched while unmerged, bit-exact), merging and
// switching while merged, removing a merged adapter, mixed-adapter batches against a per-column
// reference, weighted combinations (cat exact, svd = best rank-t approximation of the dense sum,
// checked with Eigen's SVD of the dense matrix), and PEFT save/load into named slots.
#include "test_helpers.hpp"

#include <lora/multi_lora_linear.hpp>
#include <lora/peft/adapter_io.hpp>
#include <lora/weighted_adapter.hpp>

#include <Eigen/SVD>

#include <sys/stat.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace test_multi_adapter {
namespace {

using Multi = lora::MultiLoRALinear<double>;
using Eigen::MatrixXd;
using Eigen::VectorXd;

lora::LoRAConfig config(int rank, double alpha, std::uint64_t seed, bool rslora = false) {
  lora::LoRAConfig c;
  c.rank = rank;
  c.alpha = alpha;
  c.seed = seed;
  c.use_rslora = rslora;
  return c;
}

/// A layer with three non-zero adapters of different ranks and scalings ("a" with a lora bias).
Multi make_layer(lora::MergeMode mode = lora::MergeMode::InPlace, Eigen::Index d = 12,
                 Eigen::Index k = 10) {
  Multi layer(lora::DenseFrozenWeight<double>(MatrixXd::Random(d, k), mode), VectorXd::Random(d));
  layer.add_adapter("a", config(2, 4, 1)).B().setRandom();
  layer.adapter("a").set_lora_bias(VectorXd::Random(d));
  layer.add_adapter("b", config(3, 5, 2, true)).B().setRandom();
  layer.add_adapter("c", config(4, 8, 3)).B().setRandom();
  return layer;
}

/// The dense reference of adapter `a` on X: s B A X + s b_B.
MatrixXd reference_delta(const lora::LoRAAdapter<double>& a, const MatrixXd& X) {
  MatrixXd out = a.scaling() * a.B() * a.A() * X;
  if (a.has_lora_bias()) out.colwise() += a.scaling() * a.lora_bias();
  return out;
}

MatrixXd reference_base(const Multi& layer, const MatrixXd& X) {
  return (layer.weight() * X).colwise() + layer.bias();
}

bool bit_identical(const MatrixXd& a, const MatrixXd& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(double) * a.size()) == 0;
}

TEST(MultiLoRA, ActiveAdapterAndDisable) {
  Multi layer = make_layer();
  const MatrixXd X = MatrixXd::Random(10, 5);
  const MatrixXd base = reference_base(layer, X);
  EXPECT_EQ(layer.active_name(), "a");  // the first adapter added is active, as in PEFT
  layer.disable();
  EXPECT_FALSE(layer.has_active());
  EXPECT_MATRIX_NEAR(layer.forward(X), base, 1e-14);
  for (const char* name : {"a", "b", "c"}) {
    layer.set_active(name);
    EXPECT_EQ(layer.active_name(), name);
    EXPECT_MATRIX_NEAR(layer.forward(X), base + reference_delta(layer.adapter(name), X), 1e-13)
        << name;
  }
  EXPECT_DOUBLE_EQ(layer.adapter("b").scaling(), 5.0 / std::sqrt(3.0));
  layer.disable();
  EXPECT_MATRIX_NEAR(layer.forward(X), base, 1e-14);
}

TEST(MultiLoRA, SwitchingWhileUnmergedLeavesW0BitIdentical) {
  Multi layer = make_layer();
  const MatrixXd W0 = layer.weight();
  const double* storage = layer.frozen().matrix().data();
  for (int i = 0; i < 100; ++i) layer.set_active(i % 3 == 0 ? "a" : i % 3 == 1 ? "b" : "c");
  layer.disable();
  layer.set_active("b");
  EXPECT_TRUE(bit_identical(layer.weight(), W0));
  EXPECT_EQ(layer.frozen().matrix().data(), storage);  // not copied either
}

TEST(MultiLoRA, MergeAndSwitchWhileMerged) {
  for (const auto mode : {lora::MergeMode::InPlace, lora::MergeMode::ExactRestore}) {
    Multi layer = make_layer(mode);
    const MatrixXd W0 = layer.weight();
    const MatrixXd X = MatrixXd::Random(10, 6);
    layer.disable();
    EXPECT_THROW(layer.merge(), std::logic_error);  // nothing active
    layer.set_active("a");
    layer.merge();
    const auto& a = std::as_const(layer).adapter("a");
    EXPECT_MATRIX_NEAR(layer.weight(), W0 + a.scaling() * a.B() * a.A(), 1e-14);
    const MatrixXd base = (W0 * X).colwise() + layer.bias();
    EXPECT_MATRIX_NEAR(layer.forward(X), base + reference_delta(a, X), 1e-13);
    EXPECT_THROW(layer.forward_mixed(X, {0, 0, 0, 0, 0, 0}), std::logic_error);
    layer.set_active("c");  // unmerge a, merge c
    EXPECT_TRUE(layer.is_merged());
    const auto& c = std::as_const(layer).adapter("c");
    EXPECT_MATRIX_NEAR(layer.weight(), W0 + c.scaling() * c.B() * c.A(), 1e-14);
    EXPECT_MATRIX_NEAR(layer.forward(X), base + reference_delta(c, X), 1e-13);
    layer.disable();  // unmerges
    EXPECT_FALSE(layer.is_merged());
    if (mode == lora::MergeMode::ExactRestore) {
      EXPECT_TRUE(bit_identical(layer.weight(), W0));
    } else {
      EXPECT_MATRIX_NEAR(layer.weight(), W0, 1e-14);
    }
  }
}

TEST(MultiLoRA, RemovingTheMergedAdapterRemovesItsDelta) {
  Multi layer = make_layer(lora::MergeMode::ExactRestore);
  const MatrixXd W0 = layer.weight();
  layer.set_active("b");
  layer.merge();
  layer.remove_adapter("b");
  EXPECT_FALSE(layer.is_merged());
  EXPECT_FALSE(layer.has_active());
  EXPECT_TRUE(bit_identical(layer.weight(), W0));  // PEFT leaves the delta behind (peft#3498)
  EXPECT_EQ(layer.adapter_names(), (std::vector<std::string>{"a", "c"}));
  // Removing another adapter keeps the active one (its index shifts).
  layer.set_active("c");
  layer.remove_adapter("a");
  EXPECT_EQ(layer.active_name(), "c");
  EXPECT_EQ(layer.adapter_index("c"), 0);
}

TEST(MultiLoRA, MergeRefusesANonFiniteAdapterAndKeepsTheOldOne) {
  Multi layer = make_layer();
  layer.set_active("a");
  layer.merge();
  const MatrixXd merged = layer.weight();
  layer.add_adapter("bad", config(2, 4, 9)).B()(0, 0) = std::nan("");
  EXPECT_THROW(layer.set_active("bad"), std::domain_error);
  EXPECT_EQ(layer.active_name(), "a");
  EXPECT_TRUE(bit_identical(layer.weight(), merged));
}

TEST(MultiLoRA, MixedBatchEqualsEachColumnThroughItsOwnAdapter) {
  Multi layer = make_layer();
  const MatrixXd W0 = layer.weight();
  const MatrixXd X = MatrixXd::Random(10, 9);
  const std::vector<int> which = {2, Multi::kNoAdapter, 0, 1, 0, 2, 2, Multi::kNoAdapter, 1};
  layer.set_active("b");  // ignored by mixed batches
  const MatrixXd H = layer.forward_mixed(X, which);
  const std::vector<std::string> names = layer.adapter_names();
  for (Eigen::Index j = 0; j < X.cols(); ++j) {
    MatrixXd expected = W0 * X.col(j) + layer.bias();
    if (which[j] >= 0) expected += reference_delta(layer.adapter(names[which[j]]), X.col(j));
    EXPECT_MATRIX_NEAR(H.col(j), expected, 1e-13) << "column " << j;
  }
  EXPECT_TRUE(bit_identical(layer.weight(), W0));
  // Out-parameter form with a reused workspace gives the same numbers.
  lora::Workspace<double> ws;
  MatrixXd H2(12, 9);
  layer.forward_mixed(X, which, H2, ws);
  layer.forward_mixed(X, which, H2, ws);
  EXPECT_TRUE(bit_identical(H, H2));
  EXPECT_THROW(layer.forward_mixed(X, {0, 1}), std::invalid_argument);
  std::vector<int> bad = which;
  bad[3] = 3;
  EXPECT_THROW(layer.forward_mixed(X, bad), std::invalid_argument);
}

TEST(MultiLoRA, BackwardTrainsOnlyTheActiveAdapter) {
  Multi layer = make_layer();
  layer.set_active("c");
  const MatrixXd X = MatrixXd::Random(10, 4), G = MatrixXd::Random(12, 4);
  const MatrixXd dX = layer.backward(X, G);
  const auto& c = layer.adapter("c");
  const double s = c.scaling();
  EXPECT_MATRIX_NEAR(c.grad_B(), s * G * (c.A() * X).transpose(), 1e-13);
  EXPECT_MATRIX_NEAR(c.grad_A(), s * c.B().transpose() * G * X.transpose(), 1e-13);
  EXPECT_MATRIX_NEAR(dX, (layer.weight() + s * c.B() * c.A()).transpose() * G, 1e-13);
  EXPECT_EQ(layer.adapter("a").grad_A().norm(), 0.0);
  layer.disable();
  EXPECT_THROW(layer.backward(X, G), std::logic_error);
}

TEST(MultiLoRA, ErrorsNameWhatWasWrong) {
  Multi layer = make_layer();
  EXPECT_THROW(layer.add_adapter("a", config(2, 4, 1)), std::invalid_argument);
  EXPECT_THROW(layer.add_adapter("x", lora::LoRAAdapter<double>(5, 10, config(2, 4, 1))),
               std::invalid_argument);
  try {
    layer.set_active("nope");
    ADD_FAILURE();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(
        std::string(e.what()).find("no adapter named \"nope\" (adapters: \"a\", \"b\", \"c\")"),
        std::string::npos)
        << e.what();
  }
  // The first adapter added is active (as PEFT); with none active, active_name() refuses.
  EXPECT_EQ(layer.active_name(), "a");
  layer.disable();
  EXPECT_THROW(layer.active_name(), std::logic_error);
}

// ---- weighted combinations ----------------------------------------------------------------------

MatrixXd dense_sum(const Multi& layer, const std::vector<std::string>& names,
                   const std::vector<double>& w) {
  MatrixXd D = MatrixXd::Zero(layer.out_features(), layer.in_features());
  for (std::size_t i = 0; i < names.size(); ++i) {
    const auto& a = layer.adapter(names[i]);
    D += w[i] * a.scaling() * a.B() * a.A();
  }
  return D;
}

TEST(WeightedAdapter, CatIsExact) {
  Multi layer = make_layer();
  const std::vector<std::string> names = {"a", "b", "c"};
  const std::vector<double> w = {0.5, -1.25, 2.0};
  const auto& cat = layer.add_weighted_adapter("cat", names, w, lora::Combination::Cat);
  EXPECT_EQ(cat.rank(), 2 + 3 + 4);
  EXPECT_DOUBLE_EQ(cat.scaling(), 1.0);
  EXPECT_MATRIX_NEAR(MatrixXd(cat.B() * cat.A()), dense_sum(layer, names, w), 1e-14);
  // PEFT's placement: the weight and scaling on A, B copied.
  EXPECT_TRUE(cat.B().leftCols(2) == layer.adapter("a").B());
  EXPECT_MATRIX_NEAR(MatrixXd(cat.A().topRows(2)), 0.5 * 2.0 * layer.adapter("a").A(), 1e-15);
  // Lora biases add up exactly; forward with the combination = the weighted sum of forwards.
  const MatrixXd X = MatrixXd::Random(10, 3);
  layer.set_active("cat");
  MatrixXd expected = reference_base(layer, X);
  for (std::size_t i = 0; i < names.size(); ++i)
    expected += w[i] * reference_delta(layer.adapter(names[i]), X);
  EXPECT_MATRIX_NEAR(layer.forward(X), expected, 1e-13);
}

TEST(WeightedAdapter, SvdIsTheBestRankTApproximationOfTheDenseSum) {
  Multi layer = make_layer(lora::MergeMode::InPlace, 30, 20);
  const std::vector<std::string> names = {"a", "b", "c"};
  const std::vector<double> w = {1.0, 0.7, -0.4};
  const MatrixXd D = dense_sum(layer, names, w);
  Eigen::JacobiSVD<MatrixXd> svd(D, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const VectorXd sigma = svd.singularValues();
  for (const int t : {1, 3, 4, 9}) {
    const auto& c =
        layer.add_weighted_adapter("svd" + std::to_string(t), names, w, lora::Combination::Svd, t);
    EXPECT_EQ(c.rank(), t);
    const MatrixXd best = svd.matrixU().leftCols(t) * sigma.head(t).asDiagonal() *
                          svd.matrixV().leftCols(t).transpose();
    const MatrixXd mine = c.scaling() * c.B() * c.A();
    EXPECT_MATRIX_NEAR(mine, best, 1e-10) << "t = " << t;
    // Eckart-Young: the error is the tail of the singular values.
    EXPECT_NEAR((D - mine).norm(), sigma.tail(sigma.size() - t).norm(), 1e-10 * sigma(0));
    // PEFT's layout: B = U S (orthogonal columns scaled by sigma), A = V^T (orthonormal rows).
    EXPECT_MATRIX_NEAR(MatrixXd(c.A() * c.A().transpose()), MatrixXd::Identity(t, t), 1e-12);
    EXPECT_MATRIX_NEAR(VectorXd(c.B().colwise().norm().transpose()), VectorXd(sigma.head(t)),
                       1e-12);
  }
  // Rank 9 = the sum of the ranks: exact. Default rank: the largest input rank (4).
  EXPECT_EQ(layer.add_weighted_adapter("svd_default", names, w, lora::Combination::Svd).rank(), 4);
  EXPECT_THROW(layer.add_weighted_adapter("too_big", names, w, lora::Combination::Svd, 10),
               std::invalid_argument);
  EXPECT_THROW(layer.add_weighted_adapter("mismatch", names, {1.0}, lora::Combination::Cat),
               std::invalid_argument);
}

// ---- PEFT files into named slots --------------------------------------------------------------

TEST(MultiLoRA, LoadsAndSavesPeftAdaptersInNamedSlots) {
  const auto st = lora::io::SafeTensors::load(
      lora::test::fixture_path("peft/llama_adapter_modules.safetensors"));
  const std::string fixture = lora::test::fixture_path("peft/llama_adapter");
  std::map<std::string, std::unique_ptr<lora::MultiLoRALinear<float>>> layers;
  std::map<std::string, lora::MultiLoRALinear<float>*> targets;
  for (const auto& key : st.names()) {
    if (key.size() < 3 || key.compare(key.size() - 3, 3, "/W0") != 0) continue;
    std::string path = key.substr(std::string("base_model/model/").size());
    path.resize(path.size() - 3);
    std::replace(path.begin(), path.end(), '/', '.');
    layers[path] = std::make_unique<lora::MultiLoRALinear<float>>(st.matrix<float>(key));
    targets[path] = layers[path].get();
  }
  lora::peft::load_adapter(fixture, targets, "task");
  EXPECT_THROW(lora::peft::load_adapter(fixture, targets, "task"), std::invalid_argument);
  for (auto& [path, layer] : layers) {
    layer->add_adapter("other", config(2, 4, 5));
    layer->set_active("task");
    const std::string base = "base_model/model/" + path;
    std::string key = base;
    std::replace(key.begin(), key.end(), '.', '/');
    const Eigen::MatrixXf x = st.matrix<float>(key + "/x").transpose();
    const Eigen::MatrixXf y = st.matrix<float>(key + "/y").transpose();
    EXPECT_MATRIX_NEAR(layer->forward(x), y, 1e-5) << path;
  }
  const std::string out = std::string(LORA_TEST_TMP_DIR) + "/multi_saved";
  lora::peft::save_adapter(out, targets, "task");
  EXPECT_TRUE(lora::test::read_bytes(out + "/adapter_model.safetensors") ==
              lora::test::read_bytes(fixture + "/adapter_model.safetensors"));
}

}  // namespace
}  // namespace test_multi_adapter
