// Serving many adapters on one base: the segmented mixed-batch kernel, the weighted active set,
// the adapter store and hot swap. Every output is compared with a plain dense computation
// ((W0 + sum s B A) x + b in double) and every gradient with finite differences.
#include "test_helpers.hpp"

#include <lora/lora.hpp>

#include <gtest/gtest.h>

#include <sys/stat.h>

#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace test_serving {

using Eigen::MatrixXd;
using Eigen::VectorXd;
using Layer = lora::MultiLoRALinear<double>;

MatrixXd normal(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed, double sd = 1.0) {
  lora::Rng rng(seed);
  MatrixXd m(rows, cols);
  lora::fill_normal(m, rng, 0.0, sd);
  return m;
}

lora::LoRAConfig config(int rank, double alpha, std::uint64_t seed) {
  lora::LoRAConfig cfg;
  cfg.rank = rank;
  cfg.alpha = alpha;
  cfg.seed = seed;
  return cfg;
}

/// An adapter with a non-zero B (a fresh one has B = 0, which would hide a missing term).
lora::LoRAAdapter<double> adapter(Eigen::Index d, Eigen::Index k, int rank, double alpha,
                                  std::uint64_t seed) {
  lora::LoRAAdapter<double> a(d, k, config(rank, alpha, seed));
  a.B() = normal(d, rank, seed + 100, 0.3);
  return a;
}

/// s B A (+ the lora bias as a separate term): the adapter's dense delta.
MatrixXd delta(const lora::LoRAAdapter<double>& a) {
  return a.scaling() * a.B() * a.A();
}

std::string tmp_dir(const std::string& name) {
  const std::string dir = std::string(LORA_TEST_TMP_DIR) + "/serving_" + name;
  ::mkdir(dir.c_str(), 0777);
  return dir;
}

// ---- the segmented mixed batch --------------------------------------------------------------

TEST(Serving, MixedBatchOfManyAdaptersMatchesEachColumnsDenseReference) {
  const int d = 12, k = 10, count = 6;
  Layer layer(normal(d, k, 1), normal(d, 1, 2).col(0));
  for (int a = 0; a < count; ++a)
    layer.add_adapter("a" + std::to_string(a), adapter(d, k, 1 + a % 4, 2.0 + a, 10 + a));
  layer.adapter("a3").set_lora_bias(normal(d, 1, 40).col(0));
  layer.eval();
  // Scattered columns (a0, a1), adjacent ones (a2), single columns (a3, a5), the base (-1), and
  // an adapter with no column (a4).
  const std::vector<int> which = {0, 1, 0, 2, 2, 2, -1, 3, 1, 0, 5, -1};
  const MatrixXd X = normal(k, static_cast<Eigen::Index>(which.size()), 3);
  lora::Workspace<double> ws;
  MatrixXd H(d, X.cols());
  for (int rep = 0; rep < 2; ++rep) {  // a second call with the grown workspace
    layer.forward_mixed(X, which, H, ws);
    for (Eigen::Index j = 0; j < X.cols(); ++j) {
      SCOPED_TRACE(j);
      MatrixXd W = layer.frozen().weight();
      VectorXd ref_bias = layer.bias();
      const int a = which[static_cast<std::size_t>(j)];
      if (a >= 0) {
        const auto& ad = layer.adapter("a" + std::to_string(a));
        W += delta(ad);
        if (ad.has_lora_bias()) ref_bias += ad.scaling() * ad.lora_bias();
      }
      const VectorXd ref = W * X.col(j) + ref_bias;
      EXPECT_MATRIX_NEAR(H.col(j), ref, 1e-13);
    }
  }
}

// ---- the weighted active set ----------------------------------------------------------------

struct WeightedFixture {
  static constexpr int d = 9, k = 7, n = 5;
  Layer layer{normal(d, k, 1), normal(d, 1, 2).col(0)};
  std::vector<std::string> names{"x", "y", "z"};
  std::vector<double> weights{0.7, -1.3, 2.0};
  WeightedFixture() {
    layer.add_adapter("x", adapter(d, k, 2, 4.0, 11));
    layer.add_adapter("y", adapter(d, k, 3, 3.0, 12));
    layer.add_adapter("z", adapter(d, k, 1, 1.0, 13));
    layer.adapter("y").set_lora_bias(normal(d, 1, 14).col(0));
  }
  /// The dense reference: (W0 + sum w_i s_i B_i A_i) X + b + sum w_i s_i b_i.
  MatrixXd reference(const MatrixXd& X) const {
    MatrixXd W = layer.frozen().weight();
    VectorXd b = layer.bias();
    for (std::size_t i = 0; i < names.size(); ++i) {
      const auto& a = layer.adapter(names[i]);
      W += weights[i] * delta(a);
      if (a.has_lora_bias()) b += weights[i] * a.scaling() * a.lora_bias();
    }
    return (W * X).colwise() + b;
  }
};

TEST(Serving, WeightedActiveSetForwardMatchesTheDenseWeightedSum) {
  WeightedFixture f;
  const lora::WeightedActiveSet<double> set(f.layer, f.names, f.weights);
  const MatrixXd X = normal(f.k, f.n, 5);
  EXPECT_MATRIX_NEAR(set.forward(X), f.reference(X), 1e-13);
  EXPECT_THROW(lora::WeightedActiveSet<double>(f.layer, {"x", "x"}, {1, 1}), std::invalid_argument);
  EXPECT_THROW(lora::WeightedActiveSet<double>(f.layer, {"x"}, {1, 2}), std::invalid_argument);
  EXPECT_THROW(lora::WeightedActiveSet<double>(f.layer, {"nope"}, {1}), std::invalid_argument);
}

TEST(Serving, WeightedActiveSetGradientsMatchFiniteDifferences) {
  WeightedFixture f;
  lora::WeightedActiveSet<double> set(f.layer, f.names, f.weights);
  MatrixXd X = normal(f.k, f.n, 5);
  const MatrixXd R = normal(f.d, f.n, 6);  // L = sum(R .* H), so dL/dH = R
  auto loss = [&] { return (R.array() * set.forward(X).array()).sum(); };
  f.layer.zero_grad();
  const MatrixXd dX = set.backward(X, R);
  EXPECT_MATRIX_NEAR(dX, lora::test::numeric_gradient(X, loss), 1e-7);
  for (const auto& name : f.names) {
    SCOPED_TRACE(name);
    auto& a = f.layer.adapter(name);
    EXPECT_MATRIX_NEAR(a.grad_A(), lora::test::numeric_gradient(a.A(), loss), 1e-7);
    EXPECT_MATRIX_NEAR(a.grad_B(), lora::test::numeric_gradient(a.B(), loss), 1e-7);
    if (a.has_lora_bias()) {
      EXPECT_MATRIX_NEAR(a.grad_lora_bias(), lora::test::numeric_gradient(a.lora_bias(), loss),
                         1e-7);
    }
  }
}

TEST(Serving, WeightedActiveSetMergesExactlyAndUnmergesToW0BitForBit) {
  WeightedFixture f;
  Layer& layer = f.layer;
  layer = Layer(lora::DenseFrozenWeight<double>(normal(f.d, f.k, 1), lora::MergeMode::ExactRestore),
                normal(f.d, 1, 2).col(0));
  layer.add_adapter("x", adapter(f.d, f.k, 2, 4.0, 11));
  layer.add_adapter("y", adapter(f.d, f.k, 3, 3.0, 12));
  layer.add_adapter("z", adapter(f.d, f.k, 1, 1.0, 13));
  layer.set_active("z");
  const MatrixXd W0 = layer.weight();
  lora::WeightedActiveSet<double> set(layer, f.names, f.weights);
  const MatrixXd X = normal(f.k, f.n, 5);
  const MatrixXd unmerged = set.forward(X);
  const MatrixXd ref = f.reference(X);  // before merge: reference() reads the weight in use
  EXPECT_MATRIX_NEAR(unmerged, ref, 1e-13);
  set.merge();
  EXPECT_TRUE(set.merged());
  EXPECT_TRUE(layer.is_merged());
  EXPECT_MATRIX_NEAR(set.forward(X), ref, 1e-13);
  EXPECT_THROW(set.backward(X, MatrixXd::Zero(f.d, f.n)), std::logic_error);
  set.unmerge();
  EXPECT_TRUE(layer.weight() == W0);  // bit for bit
  EXPECT_EQ(layer.active_name(), "z");
  EXPECT_FALSE(layer.has_adapter(lora::WeightedActiveSet<double>::kMergedName));
}

// ---- the adapter store ----------------------------------------------------------------------

TEST(Serving, AdapterStoreLoadsPeftDirectoriesOnFirstUseAndEvictsTheLeastRecentlyUsed) {
  const int d = 8, k = 6;
  const MatrixXd W0 = normal(d, k, 1);
  const VectorXd bias = normal(d, 1, 2).col(0);
  const lora::DenseFrozenWeight<double> base(W0);
  // Three PEFT directories for module "proj"; "other" adapts another module only.
  std::vector<lora::LoRAAdapter<double>> adapters;
  std::vector<std::string> dirs;
  for (int i = 0; i < 3; ++i) {
    adapters.push_back(adapter(d, k, 2 + i, 8.0, 20 + i));
    dirs.push_back(tmp_dir("store_" + std::to_string(i)));
    lora::peft::write_adapter<double>(dirs.back(), {{"proj", &adapters.back()}});
  }
  const std::string other = tmp_dir("store_other");
  lora::peft::write_adapter<double>(other, {{"other", &adapters[0]}});

  // Room for the two largest of them, not three.
  const std::size_t budget =
      lora::peft::AdapterStore<double>::bytes_of(lora::peft::read_adapter<double>(dirs[1])) +
      lora::peft::AdapterStore<double>::bytes_of(lora::peft::read_adapter<double>(dirs[2]));
  lora::peft::AdapterStore<double> store(budget);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(store.add("a" + std::to_string(i), dirs[i]), i);
  EXPECT_EQ(store.add("other", other), 3);
  EXPECT_EQ(store.add("missing", tmp_dir("store_missing")), 4);  // not read: no error yet
  EXPECT_THROW(store.add("a0", dirs[0]), std::invalid_argument);
  EXPECT_EQ(store.resident_count(), 0u);
  EXPECT_EQ(store.id("a2"), 2);

  const std::vector<int> ids = {0, 1, -1, 0, 3, 1};
  const MatrixXd X = normal(k, 6, 3);
  MatrixXd H(d, 6);
  lora::Workspace<double> ws;
  store.forward_mixed(base, bias, "proj", X, ids, H, ws);
  for (Eigen::Index j = 0; j < 6; ++j) {
    const int id = ids[static_cast<std::size_t>(j)];
    MatrixXd W = W0;
    if (id >= 0 && id < 3) W += delta(adapters[static_cast<std::size_t>(id)]);  // "other": base
    EXPECT_MATRIX_NEAR(H.col(j), VectorXd(W * X.col(j) + bias), 1e-13) << "column " << j;
  }
  EXPECT_EQ(store.loads(), 3u);
  EXPECT_TRUE(store.resident(0) && store.resident(1) && store.resident(3));

  // a2 needs room: the least recently used go first (a0, then "other"), a1 stays.
  store.get(1);
  store.get(2);
  EXPECT_FALSE(store.resident(0));
  EXPECT_TRUE(store.resident(1));
  EXPECT_TRUE(store.resident(2));
  EXPECT_LE(store.resident_bytes(), budget);
  store.get(0);  // reloads
  EXPECT_EQ(store.loads(), 5u);

  // A pin outlives eviction; replace() makes the next use load the new source.
  const auto pinned = store.get(0);
  store.replace(0, dirs[2]);
  EXPECT_FALSE(store.resident(0));
  EXPECT_EQ(pinned->modules.at("proj").rank(), 2);
  EXPECT_EQ(store.get(0)->modules.at("proj").rank(), 4);

  EXPECT_ANY_THROW(store.get(4));  // the missing directory: refused on first use
  EXPECT_FALSE(store.resident(4));
  EXPECT_THROW(store.get(5), std::invalid_argument);
  EXPECT_THROW(store.forward_mixed(base, bias, "proj", X, {0, 1}, H, ws), std::invalid_argument);
}

// ---- hot swap -------------------------------------------------------------------------------

TEST(Serving, HotSwapReplacesTensorsInPlaceZeroPaddingASmallerRank) {
  const int d = 10, k = 8, max_rank = 6;
  Layer layer(normal(d, k, 1));
  layer.add_adapter("live", adapter(d, k, max_rank, 12.0, 30));
  layer.set_active("live");
  layer.eval();
  auto views = layer.parameters("live");
  const double* A_data = layer.adapter("live").A().data();
  lora::Workspace<double> ws;
  const MatrixXd X = normal(k, 4, 2);
  MatrixXd H(d, 4);
  layer.forward(X, H, ws);

  const lora::LoRAAdapter<double> incoming = adapter(d, k, 3, 5.0, 31);  // rank 3, s = 5/3
  const std::string dir = tmp_dir("hotswap");
  lora::peft::write_adapter<double>(dir, {{"proj", &incoming}});
  const std::map<std::string, Layer*> layers = {{"proj", &layer}};
  lora::peft::hotswap_adapter(dir, layers, "live");

  const auto& now = layer.adapter("live");
  EXPECT_EQ(now.rank(), max_rank);
  EXPECT_EQ(now.A().data(), A_data);  // the same buffers
  for (const auto& v : views) EXPECT_TRUE(v.valid()) << v.name;
  EXPECT_EQ(views[0].value(0, 0), now.A()(0, 0));  // and the views see the new values
  EXPECT_EQ(now.scaling(), incoming.scaling());
  EXPECT_TRUE(now.A().bottomRows(max_rank - 3).isZero(0));
  EXPECT_TRUE(now.B().rightCols(max_rank - 3).isZero(0));
  layer.forward(X, H, ws);
  EXPECT_MATRIX_NEAR(H, MatrixXd((layer.frozen().weight() + delta(incoming)) * X), 1e-13);

  // Too large a rank: refused, nothing changed.
  const lora::LoRAAdapter<double> big = adapter(d, k, max_rank + 1, 4.0, 32);
  EXPECT_THROW(lora::peft::hotswap_adapter(layer, "live", big), std::invalid_argument);
  EXPECT_EQ(layer.adapter("live").scaling(), incoming.scaling());
  // From memory, a float adapter with an awkward scaling keeps it exactly.
  lora::MultiLoRALinear<float> fl(Eigen::MatrixXf::Ones(d, k));
  fl.add_adapter("live", config(7, 1.0, 1));
  lora::LoRAAdapter<float> odd(d, k, config(3, 0.1, 2));
  lora::peft::hotswap_adapter(fl, "live", odd);
  EXPECT_EQ(fl.adapter("live").scaling(), odd.scaling());
}

}  // namespace test_serving
