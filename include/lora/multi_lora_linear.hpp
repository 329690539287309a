// MultiLoRALinear<T>: one frozen linear layer W0 (d x k) carrying many named LoRA adapters, as a
// served backbone does: one active adapter (or none), switched in O(1) without touching W0 while
// unmerged, merged into the weight for dense-speed inference, and mixed-adapter batches in which
// every column names its own adapter (PEFT's `adapter_names`, Punica's batching):
//   H(:, j) = W0 X(:, j) + b + s_a B_a (A_a X(:, j)) + s_a b_a,    a = adapter of column j
#pragma once

#include "lora/adapter.hpp"
#include "lora/config.hpp"
#include "lora/dense_frozen_weight.hpp"
#include "lora/detail/check.hpp"
#include "lora/weighted_adapter.hpp"
#include "lora/workspace.hpp"

#include <Eigen/Core>

#include <cmath>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace lora {

/// A frozen layer with any number of named adapters. Shapes as LoRALinear: W0 d x k, A r x k,
/// B d x r, X k x n (a column per sample), H d x n. Each adapter keeps its own rank and scaling.
///
/// State: at most one adapter is active; forward applies it (or nothing: disable()). merge() folds
/// the active adapter into the weight; set_active() while merged unmerges the old one and merges
/// the new; remove_adapter() of the merged adapter unmerges it first, so its delta never stays
/// behind in the weight. With MergeMode::ExactRestore every unmerge gives W0 back bit for bit.
///
/// const members may be called from many threads at once; everything else needs exclusive access.
template <typename T, typename Frozen = DenseFrozenWeight<T>>
class MultiLoRALinear {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "lora::MultiLoRALinear<T> supports T = float or T = double only");

 public:
  using Scalar = T;
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;
  using Index = Eigen::Index;
  using Adapter = LoRAAdapter<T>;
  using WorkspaceType = Workspace<T>;

  /// Marks a column of a mixed batch that gets no adapter (the base output only).
  static constexpr int kNoAdapter = -1;

  /// Wraps W0 (d x k; pass an rvalue to move it in), with an optional frozen bias of length d.
  explicit MultiLoRALinear(Matrix W0, Vector bias = Vector(), MergeMode mode = MergeMode::InPlace)
      : frozen_(checked(std::move(W0)), mode), bias_(std::move(bias)) {
    detail::require(bias_.size() == 0 || bias_.size() == out_features(),
                    "MultiLoRALinear: bias must have length ", out_features(),
                    " (out_features), got ", bias_.size());
  }

  Index in_features() const { return frozen_.in_features(); }    ///< k
  Index out_features() const { return frozen_.out_features(); }  ///< d
  const Frozen& frozen() const { return frozen_; }
  bool has_bias() const { return bias_.size() != 0; }
  const Vector& bias() const { return bias_; }
  /// The weight in use: W0, or W0 + s B A of the active adapter while merged.
  decltype(auto) weight() const { return frozen_.weight(); }

  // ---- adapters --------------------------------------------------------------------------------

  /// Adds a fresh adapter (A drawn as cfg says, B = 0) named `name` and returns it.
  Adapter& add_adapter(const std::string& name, const LoRAConfig& cfg) {
    return add_adapter(name, Adapter(out_features(), in_features(), cfg));
  }

  /// Adds `adapter` (for this layer's d x k weight) under `name`. Throws std::invalid_argument for
  /// a name already in use or a shape mismatch. Does not change the active adapter.
  Adapter& add_adapter(const std::string& name, Adapter adapter) {
    detail::require(!name.empty(), "MultiLoRALinear::add_adapter: the name is empty");
    detail::require(find(name) < 0, "MultiLoRALinear::add_adapter: an adapter named \"", name,
                    "\" already exists");
    detail::require(
        adapter.out_features() == out_features() && adapter.in_features() == in_features(),
        "MultiLoRALinear::add_adapter: adapter \"", name, "\" is for a ",
        detail::shape_string(adapter.out_features(), adapter.in_features()),
        " weight, this layer's W0 is ", detail::shape_string(out_features(), in_features()));
    entries_.push_back(std::make_unique<Entry>(Entry{name, std::move(adapter)}));
    return entries_.back()->adapter;
  }

  /// Removes adapter `name`. If it is merged, its delta is first removed from the weight; if it is
  /// active, no adapter is active afterwards. Indices of later adapters shift down by one.
  void remove_adapter(const std::string& name) {
    const int i = index_or_throw("MultiLoRALinear::remove_adapter", name);
    if (i == active_) disable();
    entries_.erase(entries_.begin() + i);
    if (active_ > i) --active_;
  }

  bool has_adapter(const std::string& name) const { return find(name) >= 0; }
  std::size_t adapter_count() const { return entries_.size(); }

  /// Names in the order added: the index of a name here is its adapter_index.
  std::vector<std::string> adapter_names() const {
    std::vector<std::string> out;
    for (const auto& e : entries_) out.push_back(e->name);
    return out;
  }

  /// The index of `name` for mixed batches (its position in adapter_names()).
  int adapter_index(const std::string& name) const {
    return index_or_throw("MultiLoRALinear::adapter_index", name);
  }

  const Adapter& adapter(const std::string& name) const {
    return entries_[static_cast<std::size_t>(index_or_throw("MultiLoRALinear::adapter", name))]
        ->adapter;
  }

  /// Mutable access to adapter `name` (to train or edit it). Throws std::logic_error while that
  /// adapter is merged into the weight.
  Adapter& adapter(const std::string& name) {
    const int i = index_or_throw("MultiLoRALinear::adapter", name);
    detail::require_state(!(i == active_ && is_merged()), "MultiLoRALinear::adapter: \"", name,
                          "\" is merged; call unmerge() before changing or training it");
    return entries_[static_cast<std::size_t>(i)]->adapter;
  }

  // ---- the active adapter
  // ------------------------------------------------------------------------

  /// Makes `name` the adapter forward applies. While unmerged this is O(1) and W0 is not touched;
  /// while merged, the old adapter is unmerged and the new one merged (throws std::domain_error,
  /// changing nothing, when the new adapter is not finite or its merge would overflow).
  void set_active(const std::string& name) {
    const int i = index_or_throw("MultiLoRALinear::set_active", name);
    if (i == active_) return;
    if (is_merged()) {
      require_finite(*entries_[static_cast<std::size_t>(i)], "MultiLoRALinear::set_active");
      const int old = active_;
      unmerge();
      active_ = i;
      try {
        merge();  // may still refuse: W0 + s B A can overflow although A and B are finite
      } catch (const std::domain_error&) {
        active_ = old;
        merge();  // the old adapter was merged a moment ago: put it back, changing nothing
        throw;
      }
    } else {
      active_ = i;
    }
  }

  /// No adapter: forward gives the base output W0 X + b. Unmerges first if merged.
  void disable() {
    unmerge();
    active_ = -1;
  }

  bool has_active() const { return active_ >= 0; }

  /// The active adapter's name; throws std::logic_error when none is active.
  const std::string& active_name() const { return active().name; }

  /// Folds the active adapter into the weight (W = W0 + s B A); a no-op when merged. Throws
  /// std::logic_error without an active adapter, std::domain_error (weight untouched) when it is
  /// not finite.
  void merge() {
    if (is_merged()) return;
    const Entry& e = active();
    require_finite(e, "MultiLoRALinear::merge");
    frozen_.merge(e.adapter.scaling(), e.adapter.B(), e.adapter.A());
  }

  /// Gives W0 back (see MergeMode for the exactness); a no-op when not merged.
  void unmerge() {
    if (!is_merged()) return;
    const Entry& e = active();
    frozen_.unmerge(e.adapter.scaling(), e.adapter.B(), e.adapter.A());
  }

  bool is_merged() const { return frozen_.is_merged(); }

  // ---- forward
  // -----------------------------------------------------------------------------------

  /// H = W0 X + b (+ s B (A X) + s b_B of the active adapter).   X: k x n  ->  H: d x n.
  Matrix forward(const Eigen::Ref<const Matrix>& X) const {
    Matrix H(out_features(), X.cols());
    WorkspaceType ws;
    forward(X, H, ws);
    return H;
  }

  /// As above into H (d x n, must not overlap X); allocation-free once ws has grown.
  void forward(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H, WorkspaceType& ws) const {
    detail::require_forward_args("MultiLoRALinear::forward", X, H, out_features(), in_features());
    if (active_ < 0 || is_merged()) {
      base_forward(X, H);
      // s * b_B: the part of a merged adapter's lora bias that the weight cannot hold.
      if (active_ >= 0) active().adapter.add_lora_bias_term(H);
      return;
    }
    // As LoRALinear: H = s B (A X) + b in one pass, then the frozen product accumulates on top.
    const Adapter& a = active().adapter;
    a.assign_forward(X, H, ws.get(0, a.rank(), X.cols()), bias_);
    frozen_.multiply_add(X, H);  // (d x k)(k x n): the cost of the layer
  }

  /// A mixed-adapter batch: column j of X goes through adapter `adapters[j]` (an adapter_index, or
  /// kNoAdapter for the base alone), whatever is active. One W0 X product serves the whole batch;
  /// then each adapter's columns are gathered, multiplied by its low-rank factors and added back:
  /// O(d k n) + O(sum_a r_a (d + k) n_a). Throws std::logic_error while merged (the weight then
  /// holds one adapter's delta), std::invalid_argument for a bad index.
  Matrix forward_mixed(const Eigen::Ref<const Matrix>& X, const std::vector<int>& adapters) const {
    Matrix H(out_features(), X.cols());
    WorkspaceType ws;
    forward_mixed(X, adapters, H, ws);
    return H;
  }

  /// As above into H (d x n, must not overlap X); allocation-free once ws has grown.
  void forward_mixed(const Eigen::Ref<const Matrix>& X, const std::vector<int>& adapters,
                     Eigen::Ref<Matrix> H, WorkspaceType& ws) const {
    const char* where = "MultiLoRALinear::forward_mixed";
    detail::require_state(!is_merged(), where,
                          ": the layer is merged; call unmerge() before a mixed-adapter batch");
    detail::require(static_cast<Index>(adapters.size()) == X.cols(), where, ": ", X.cols(),
                    " columns in X but ", adapters.size(), " adapter indices");
    const int count = static_cast<int>(entries_.size());
    for (std::size_t j = 0; j < adapters.size(); ++j)
      detail::require(adapters[j] == kNoAdapter || (adapters[j] >= 0 && adapters[j] < count), where,
                      ": column ", j, " names adapter ", adapters[j], "; valid are 0..", count - 1,
                      " and kNoAdapter (-1)");
    detail::require_forward_args(where, X, H, out_features(), in_features());
    base_forward(X, H);
    for (int a = 0; a < count; ++a) {
      Index n_a = 0;
      for (int idx : adapters) n_a += idx == a;
      if (n_a == 0) continue;
      const Adapter& ad = entries_[static_cast<std::size_t>(a)]->adapter;
      auto Xa = ws.get(0, in_features(), n_a);   // k x n_a: the columns of adapter a
      auto AX = ws.get(1, ad.rank(), n_a);       // r x n_a
      auto Ya = ws.get(2, out_features(), n_a);  // d x n_a
      for (Index j = 0, c = 0; j < X.cols(); ++j)
        if (adapters[static_cast<std::size_t>(j)] == a) Xa.col(c++) = X.col(j);
      ad.assign_forward(Xa, Ya, AX, Vector());  // Ya = s B (A Xa) (+ s b_B)
      for (Index j = 0, c = 0; j < X.cols(); ++j)
        if (adapters[static_cast<std::size_t>(j)] == a) H.col(j) += Ya.col(c++);
    }
  }

  // ---- backward (the active adapter) ---------------------------------------------------------

  /// Accumulates the active adapter's gradients for G = dL/dH (d x n) and returns dL/dX (k x n):
  /// dX = W0^T G + s A^T (B^T G). Throws std::logic_error while merged or with no active adapter.
  Matrix backward(const Eigen::Ref<const Matrix>& X, const Eigen::Ref<const Matrix>& G) {
    Matrix dX(in_features(), X.cols());
    WorkspaceType ws;
    backward(X, G, dX, ws);
    return dX;
  }

  /// As above into dX (k x n, must not overlap X or G); allocation-free once ws has grown.
  void backward(const Eigen::Ref<const Matrix>& X, const Eigen::Ref<const Matrix>& G,
                Eigen::Ref<Matrix> dX, WorkspaceType& ws) {
    const char* where = "MultiLoRALinear::backward";
    Adapter& a = adapter(active_name());  // throws when none is active or it is merged
    detail::require_backward_args(where, X, G, out_features(), in_features());
    detail::require_input_gradient_arg(where, dX, X, G);
    auto BtG = ws.get(1, a.rank(), X.cols());
    a.accumulate_gradients(X, G, ws.get(0, a.rank(), X.cols()), BtG);
    a.assign_input_gradient(BtG, dX);        // dX = s A^T (B^T G): (k x r)(r x n)
    frozen_.multiply_transposed_add(G, dX);  // dX += W0^T G: (k x d)(d x n)
  }

  // ---- combinations
  // ------------------------------------------------------------------------------

  /// PEFT's add_weighted_adapter: adds adapter `name` = sum_i weights[i] s_i B_i A_i of the named
  /// adapters, exact (Combination::Cat) or truncated to rank svd_rank (Combination::Svd; 0: the
  /// largest input rank), computed from the factors (see combine_adapters). Returns it.
  Adapter& add_weighted_adapter(const std::string& name, const std::vector<std::string>& sources,
                                const std::vector<double>& weights, Combination how,
                                int svd_rank = 0) {
    std::vector<const Adapter*> parts;
    for (const auto& s : sources)
      parts.push_back(&entries_[static_cast<std::size_t>(
                                    index_or_throw("MultiLoRALinear::add_weighted_adapter", s))]
                           ->adapter);
    detail::require(find(name) < 0, "MultiLoRALinear::add_weighted_adapter: an adapter named \"",
                    name, "\" already exists");
    return add_adapter(name, combine_adapters<T>(parts, weights, how, svd_rank));
  }

 private:
  struct Entry {
    std::string name;
    Adapter adapter;
  };

  static Matrix checked(Matrix W0) {
    detail::require(W0.rows() >= 1 && W0.cols() >= 1,
                    "MultiLoRALinear: W0 must be at least 1 x 1, got ",
                    detail::shape_string(W0.rows(), W0.cols()));
    return W0;
  }

  int find(const std::string& name) const {
    for (std::size_t i = 0; i < entries_.size(); ++i)
      if (entries_[i]->name == name) return static_cast<int>(i);
    return -1;
  }

  int index_or_throw(const char* where, const std::string& name) const {
    const int i = find(name);
    if (i < 0) {
      std::string known;
      for (const auto& e : entries_) known += (known.empty() ? "\"" : ", \"") + e->name + "\"";
      throw std::invalid_argument(detail::concat(where, ": no adapter named \"", name,
                                                 "\" (adapters: ", known.empty() ? "none" : known,
                                                 ")"));
    }
    return i;
  }

  const Entry& active() const {
    detail::require_state(active_ >= 0, "MultiLoRALinear: no adapter is active; call set_active");
    return *entries_[static_cast<std::size_t>(active_)];
  }

  static void require_finite(const Entry& e, const char* where) {
    if (!std::isfinite(static_cast<double>(e.adapter.scaling())) || !e.adapter.A().allFinite() ||
        !e.adapter.B().allFinite())
      throw std::domain_error(detail::concat(where, ": adapter \"", e.name,
                                             "\" is not finite; the weight was left as it was"));
  }

  /// H = W X + b: the one dense product of the batch, (d x k)(k x n).
  void base_forward(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H) const {
    if (has_bias()) {
      H.colwise() = bias_;
      frozen_.multiply_add(X, H);
    } else {
      frozen_.multiply(X, H);
    }
  }

  Frozen frozen_;
  Vector bias_;
  std::vector<std::unique_ptr<Entry>> entries_;  // stable addresses: add_adapter returns a ref
  int active_ = -1;
};

}  // namespace lora
