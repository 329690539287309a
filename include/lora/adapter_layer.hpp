// AdapterLayer<T, Frozen>: the one implementation of a LoRA layer. A frozen linear layer
// (W0: d x k in a frozen storage, optional bias b) carrying a set of named LoRA adapters, one of
// which may be active:
//   H = W0 X + b + s B (A X)                      (the paper's Eq. 3, a column per sample)
// LoRALinear (one adapter) and MultiLoRALinear (many, mixed batches) are faces of this class: both
// derive from it, the public members here are theirs, and MultiLoRALinear also makes public the
// multi-adapter members (the "protected:" blocks). Every feature (dropout, train/eval, the
// out-parameter API, merge modes, finite checks, parameter views, every frozen storage) is
// written here once. docs/design.md describes the data flow.
#pragma once

#include "lora/adapter.hpp"
#include "lora/config.hpp"
#include "lora/dense_frozen_weight.hpp"
#include "lora/detail/check.hpp"
#include "lora/detail/finite.hpp"
#include "lora/frozen_storage.hpp"
#include "lora/parameter.hpp"
#include "lora/random.hpp"
#include "lora/workspace.hpp"

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace lora {

/// A frozen linear layer with named LoRA adapters. Shapes: W0 is d x k (out x in, the layout of
/// torch.nn.Linear.weight), an adapter's A is r x k and B is d x r, inputs X are k x n with one
/// column per sample, outputs H are d x n.
///
/// The convenience calls return new matrices; the out-parameter overloads write into caller-owned
/// storage and take a Workspace, and allocate nothing once the workspace has grown to the batch
/// (with a storage whose allocation_free() is true). const members are safe to call from many
/// threads at once, except a training-mode forward with LoRA dropout (see train()); anything
/// that changes the layer needs exclusive access.
///
/// Merge guarantee: merge() keeps a copy of the factors it folded in (r (d + k) numbers), and
/// unmerge() removes exactly those, whatever happened to the adapter in between (an optimizer step,
/// a write through a held reference, a replaced adapter). A forward while merged checks that the
/// active adapter still equals what was merged, and throws std::logic_error if not, so a merged
/// layer never silently serves a stale adapter.
template <typename T, typename Frozen = DenseFrozenWeight<T>>
class AdapterLayer {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "lora: layers support T = float or T = double only; convert the weight with "
                ".template cast<float>() first.");
  static_assert(check_frozen_storage<Frozen>());
  static_assert(std::is_same_v<typename Frozen::Scalar, T>,
                "lora: the layer's T must be its frozen storage's Scalar (e.g. "
                "LoRALinear<float, Bf16FrozenWeight>).");

 public:
  using Scalar = T;
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;
  using Index = Eigen::Index;
  using Adapter = LoRAAdapter<T>;
  using WorkspaceType = Workspace<T>;
  using FrozenStorage = Frozen;

 protected:
  // The multi-adapter part of the API (this block and the two below, marked "protected:"):
  // MultiLoRALinear re-exports it with `using`; LoRALinear, a layer of one adapter, keeps it
  // hidden. Everything public here is public in both faces, written once.

  /// Marks a column of a mixed batch that gets no adapter (the base output only).
  static constexpr int kNoAdapter = -1;

  /// Wraps a frozen storage and a frozen bias (length d, or empty); `face` names the class in
  /// error messages.
  AdapterLayer(Frozen frozen, Vector bias, const char* face)
      : frozen_(std::move(frozen)), bias_(std::move(bias)), face_(face) {
    detail::require(bias_.size() == 0 || bias_.size() == out_features(), face_,
                    ": bias must have length ", out_features(), " (out_features), got ",
                    bias_.size());
  }

 public:
  AdapterLayer(const AdapterLayer& o)
      : frozen_(o.frozen_),
        bias_(o.bias_),
        active_(o.active_),
        merged_(o.merged_),
        training_(o.training_),
        face_(o.face_),
        dropout_rng_(o.dropout_rng_),
        mask_storage_(o.mask_storage_),
        mask_rows_(o.mask_rows_),
        mask_cols_(o.mask_cols_) {
    entries_.reserve(o.entries_.size());
    for (const auto& e : o.entries_) entries_.push_back(std::make_unique<Entry>(*e));
  }
  AdapterLayer& operator=(const AdapterLayer& o) {
    if (this != &o) *this = AdapterLayer(o);
    return *this;
  }
  AdapterLayer(AdapterLayer&&) noexcept = default;
  AdapterLayer& operator=(AdapterLayer&&) noexcept = default;

  // ---- the frozen side -------------------------------------------------------------------------

  Index in_features() const { return frozen_.in_features(); }    ///< k
  Index out_features() const { return frozen_.out_features(); }  ///< d
  const Frozen& frozen() const { return frozen_; }
  bool has_bias() const { return bias_.size() != 0; }
  const Vector& bias() const { return bias_; }  ///< length d, or empty
  /// The weight in use as a new d x k matrix: W0, or W0 + s B A of the merged adapter.
  Matrix weight() const { return frozen_.weight(); }
  /// Frozen parameters: d * k, plus d with a bias.
  Index frozen_parameter_count() const { return out_features() * in_features() + bias_.size(); }

 protected:
  // ---- adapters --------------------------------------------------------------------------------

  /// Adds a fresh adapter (A drawn as cfg says, B = 0) named `name` and returns it.
  Adapter& add_adapter(const std::string& name, const LoRAConfig& cfg) {
    return add_adapter(name, Adapter(out_features(), in_features(), cfg));
  }

  /// Adds `adapter` (for this layer's d x k weight) under `name`. Throws std::invalid_argument for
  /// an empty name, a name already in use or a shape mismatch. Does not change the active adapter.
  Adapter& add_adapter(const std::string& name, Adapter adapter) {
    const detail::Where where{face_, "add_adapter"};
    detail::require(!name.empty(), where, ": the name is empty");
    detail::require(find(name) < 0, where, ": an adapter named \"", name, "\" already exists");
    require_fits(where, name, adapter);
    // The first adapter seeds LoRA dropout, apart from A's draw (which uses config.seed itself).
    if (entries_.empty()) dropout_rng_ = Rng(adapter.config().seed + kDropoutSeedOffset);
    entries_.push_back(std::make_unique<Entry>(Entry{name, std::move(adapter)}));
    return entries_.back()->adapter;
  }

  /// Removes adapter `name`. If it is merged, its delta is first removed from the weight; if it is
  /// active, no adapter is active afterwards. Indices of later adapters shift down by one.
  void remove_adapter(const std::string& name) {
    const int i = index_or_throw("remove_adapter", name);
    if (i == active_) disable();
    entries_.erase(entries_.begin() + i);
    if (active_ > i) --active_;
  }

  /// Gives adapter `name` the values of `adapter` (rank, scaling and tensors), copying into the
  /// existing storage where the shapes agree, so optimizer views taken earlier stay valid and see
  /// the new values; a tensor of another shape is reallocated and its old views become stale.
  /// Throws std::logic_error while that adapter is merged, std::invalid_argument for a shape that
  /// does not fit W0.
  void replace_adapter(const std::string& name, const Adapter& adapter) {
    const detail::Where where{face_, "replace_adapter"};
    const int i = index_or_throw("replace_adapter", name);
    detail::require_state(!(i == active_ && is_merged()), where, ": adapter \"", name,
                          "\" is merged; call unmerge() first");
    require_fits(where, name, adapter);
    entry(i).adapter = adapter;
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
  int adapter_index(const std::string& name) const { return index_or_throw("adapter_index", name); }

  const Adapter& adapter(const std::string& name) const {
    return entry(index_or_throw("adapter", name)).adapter;
  }
  /// Mutable access to adapter `name` (to train or edit it). Editing a merged adapter is safe:
  /// unmerge() still removes exactly what was merged, and a forward refuses until it is merged
  /// again.
  Adapter& adapter(const std::string& name) {
    return entry(index_or_throw("adapter", name)).adapter;
  }

  /// The trainable tensors of adapter `name` (A, B and its lora bias when present) as optimizer
  /// views named "<name>.A", ...; they stay valid as long as the adapter keeps its shapes.
  std::vector<ParameterView<T>> parameters(const std::string& name) {
    return adapter(name).parameters(name + ".");
  }

 public:
  /// Trainable parameters of every adapter: the sum of r * (d + k) (+ d with a lora bias).
  Index trainable_parameter_count() const {
    Index n = 0;
    for (const auto& e : entries_) n += e->adapter.parameter_count();
    return n;
  }

 protected:
  // ---- the active adapter ----------------------------------------------------------------------

  /// Makes `name` the adapter forward and backward use. While unmerged this is O(1) and W0 is not
  /// touched; while merged, the old adapter is unmerged and the new one merged (throws
  /// std::domain_error, changing nothing, when the new adapter is not finite or its merge would
  /// overflow).
  void set_active(const std::string& name) {
    const int i = index_or_throw("set_active", name);
    if (i == active_) return;
    if (!is_merged()) {
      active_ = i;
      return;
    }
    require_mergeable(detail::Where{face_, "set_active"}, entry(i));
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
  }

  /// No adapter: forward gives the base output W0 X + b. Unmerges first if merged.
  void disable() {
    unmerge();
    active_ = -1;
  }

  bool has_active() const { return active_ >= 0; }

  /// The active adapter's name; throws std::logic_error when none is active.
  const std::string& active_name() const { return active_entry("active_name").name; }

 public:
  // ---- training / evaluation mode (LoRA dropout) ------------------------------------------------

  /// Training mode (the default, as for a torch.nn.Module). With an adapter whose config().dropout
  /// = p > 0, a training-mode forward masks the adapter's input (PEFT's lora_dropout):
  ///   H = W0 X + b + s B A (M .* X),   M_ij = 0 with probability p, else 1 / (1 - p),
  /// with M drawn from the layer's own seeded generator and kept for the backward that follows.
  /// Such a forward changes the layer (the mask) although it is const: it must not run
  /// concurrently with any other call on the same layer.
  void train(bool on = true) { training_ = on; }
  /// Evaluation mode: no dropout; forward is deterministic and thread-safe.
  void eval() { training_ = false; }
  bool is_training() const { return training_; }
  /// True when forward masks the active adapter's input: training mode and its dropout > 0.
  bool dropout_active() const {
    return training_ && active_ >= 0 && entry(active_).adapter.config().dropout > 0;
  }
  /// Restarts the dropout generator (by default seeded from the first adapter's config().seed).
  void seed_dropout(std::uint64_t seed) { dropout_rng_ = Rng(seed); }
  /// The mask M of the last forward with dropout (k x n; entries 0 or 1 / (1 - p)); 0 x 0 before.
  Eigen::Map<const Matrix> dropout_mask() const {
    return Eigen::Map<const Matrix>(mask_storage_.data(), mask_rows_, mask_cols_);
  }

  // ---- forward ---------------------------------------------------------------------------------

  /// H = W0 X + b + s B (A X) with the active adapter (W0 X + b with none).   X: k x n -> H: d x n.
  Matrix forward(const Eigen::Ref<const Matrix>& X) const {
    Matrix H(out_features(), X.cols());
    WorkspaceType ws;
    forward(X, H, ws);
    return H;
  }

  /// As above into H (d x n, must not overlap X); allocation-free once ws has grown.
  void forward(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H, WorkspaceType& ws) const {
    const detail::Where where{face_, "forward"};
    detail::require_forward_args(where, X, H, out_features(), in_features());
    if (active_ < 0) {
      base_forward(X, H);
      return;
    }
    const Adapter& a = entry(active_).adapter;
    if (is_merged()) {
      // Exactly a dense layer, plus s * b_B for PEFT's lora_bias (a weight cannot hold it).
      require_merge_current(where);
      base_forward(X, H);
      a.add_lora_bias_term(H);
      return;
    }
    // (The scratch views are passed as temporaries: GCC 12 mistakes a named Map bound to a Ref
    // parameter for a dangling pointer.)
    if (dropout_active()) {
      draw_dropout_mask(X.cols(), [p = a.config().dropout](Index) { return p; });
      auto Xd = ws.get(Slot::MaskedInput, in_features(), X.cols());
      Xd = X.cwiseProduct(dropout_mask());
      a.assign_forward(Xd, H, ws.get(Slot::LowRank, a.rank(), X.cols()), bias_);
    } else {
      // H starts as the adapter's term and the bias, written in the one pass over H that the dense
      // product would spend zeroing it; the frozen product then accumulates on top.
      a.assign_forward(X, H, ws.get(Slot::LowRank, a.rank(), X.cols()), bias_);
    }
    frozen_.multiply_add(X, H);  // (d x k)(k x n): the cost of the layer
  }

 protected:
  /// A mixed-adapter batch: column j of X goes through adapter `adapters[j]` (an adapter_index, or
  /// kNoAdapter for the base alone), whatever is active. One W0 X product serves the whole batch;
  /// each adapter's columns are gathered, multiplied by its low-rank factors and written back:
  /// O(d k n) + O(sum_a r_a (d + k) n_a). In training mode each column gets its adapter's dropout.
  /// Throws std::logic_error while merged (the weight then holds one adapter's delta),
  /// std::invalid_argument for a bad index.
  Matrix forward_mixed(const Eigen::Ref<const Matrix>& X, const std::vector<int>& adapters) const {
    Matrix H(out_features(), X.cols());
    WorkspaceType ws;
    forward_mixed(X, adapters, H, ws);
    return H;
  }

  /// As above into H (d x n, must not overlap X); allocation-free once ws has grown.
  void forward_mixed(const Eigen::Ref<const Matrix>& X, const std::vector<int>& adapters,
                     Eigen::Ref<Matrix> H, WorkspaceType& ws) const {
    const detail::Where where{face_, "forward_mixed"};
    require_mixed_args(where, X, adapters);
    detail::require_forward_args(where, X, H, out_features(), in_features());
    const bool dropout = mixed_dropout_active(adapters);
    if (dropout) draw_dropout_mask(X.cols(), [&](Index j) { return column_dropout(adapters, j); });
    // Each column starts as its adapter's term plus the bias (as forward does), then the one
    // frozen product accumulates over the whole batch.
    for (int a = 0; a < static_cast<int>(entries_.size()); ++a) {
      const Index n_a = column_count(adapters, a);
      if (n_a == 0) continue;
      const Adapter& ad = entry(a).adapter;
      auto Xa = gather_input(X, adapters, a, n_a, dropout, ws);  // k x n_a
      auto Ya = ws.get(Slot::GatheredOutput, out_features(), n_a);
      ad.assign_forward(Xa, Ya, ws.get(Slot::LowRank, ad.rank(), n_a), bias_);  // d x n_a
      scatter(Ya, adapters, a, H);
    }
    for (Index j = 0; j < X.cols(); ++j) {
      if (adapters[static_cast<std::size_t>(j)] != kNoAdapter) continue;
      if (has_bias()) {
        H.col(j) = bias_;
      } else {
        H.col(j).setZero();
      }
    }
    frozen_.multiply_add(X, H);  // (d x k)(k x n)
  }

 public:
  // ---- backward --------------------------------------------------------------------------------

  /// Accumulates the active adapter's gradients for G = dL/dH (d x n) and returns dL/dX (k x n):
  ///   dX = W0^T G + s A^T (B^T G).
  /// X must be the input of the matching forward. Throws std::logic_error while merged or with no
  /// active adapter.
  Matrix backward(const Eigen::Ref<const Matrix>& X, const Eigen::Ref<const Matrix>& G) {
    Matrix dX(in_features(), X.cols());
    WorkspaceType ws;
    backward(X, G, dX, ws);
    return dX;
  }

  /// As above into dX (k x n, must not overlap X or G); allocation-free once ws has grown.
  void backward(const Eigen::Ref<const Matrix>& X, const Eigen::Ref<const Matrix>& G,
                Eigen::Ref<Matrix> dX, WorkspaceType& ws) {
    const detail::Where where{face_, "backward"};
    Adapter& a = trainable_active(where);
    detail::require_backward_args(where, X, G, out_features(), in_features());
    detail::require_input_gradient_arg(where, dX, X, G);
    auto AX = ws.get(Slot::LowRank, a.rank(), X.cols());
    auto BtG = ws.get(Slot::BackProjected, a.rank(), X.cols());
    if (dropout_active()) {
      // With the forward's mask M: dA = s (B^T G) (M .* X)^T, and the adapter's share of dX is
      // M .* (s A^T B^T G).
      a.accumulate_gradients(masked_input(where, X, ws), G, AX, BtG);
      a.assign_input_gradient(BtG, dX);  // (k x r)(r x n)
      dX.array() *= dropout_mask().array();
    } else {
      a.accumulate_gradients(X, G, AX, BtG);
      a.assign_input_gradient(BtG, dX);  // dX = s A^T (B^T G): (k x r)(r x n)
    }
    frozen_.multiply_transposed_add(G, dX);  // dX += W0^T G: (k x d)(d x n)
  }

  /// Accumulates the active adapter's gradients only, for a first layer whose input needs no
  /// gradient: O(n r (d + k)), none of the d x k work of dX.
  void backward_without_input_grad(const Eigen::Ref<const Matrix>& X,
                                   const Eigen::Ref<const Matrix>& G, WorkspaceType& ws) {
    const detail::Where where{face_, "backward_without_input_grad"};
    Adapter& a = trainable_active(where);
    detail::require_backward_args(where, X, G, out_features(), in_features());
    auto AX = ws.get(Slot::LowRank, a.rank(), X.cols());
    auto BtG = ws.get(Slot::BackProjected, a.rank(), X.cols());
    if (dropout_active()) {
      a.accumulate_gradients(masked_input(where, X, ws), G, AX, BtG);
    } else {
      a.accumulate_gradients(X, G, AX, BtG);
    }
  }

  void backward_without_input_grad(const Eigen::Ref<const Matrix>& X,
                                   const Eigen::Ref<const Matrix>& G) {
    WorkspaceType ws;
    backward_without_input_grad(X, G, ws);
  }

 protected:
  /// The backward of forward_mixed: each adapter accumulates its gradients from its own columns
  /// (exactly as if its columns had run alone), and dX = W0^T G + the adapters' terms (columns
  /// with kNoAdapter: W0^T G only). Throws std::logic_error while merged.
  Matrix backward_mixed(const Eigen::Ref<const Matrix>& X, const std::vector<int>& adapters,
                        const Eigen::Ref<const Matrix>& G) {
    Matrix dX(in_features(), X.cols());
    WorkspaceType ws;
    backward_mixed(X, adapters, G, dX, ws);
    return dX;
  }

  /// As above into dX (k x n, must not overlap X or G); allocation-free once ws has grown.
  void backward_mixed(const Eigen::Ref<const Matrix>& X, const std::vector<int>& adapters,
                      const Eigen::Ref<const Matrix>& G, Eigen::Ref<Matrix> dX, WorkspaceType& ws) {
    const detail::Where where{face_, "backward_mixed"};
    detail::require_input_gradient_arg(where, dX, X, G);
    mixed_gradients(where, X, adapters, G, &dX, ws);
    frozen_.multiply_transposed_add(G, dX);  // dX += W0^T G: (k x d)(d x n)
  }

  /// The adapters' gradients of a mixed batch, without dX.
  void backward_mixed_without_input_grad(const Eigen::Ref<const Matrix>& X,
                                         const std::vector<int>& adapters,
                                         const Eigen::Ref<const Matrix>& G, WorkspaceType& ws) {
    mixed_gradients(detail::Where{face_, "backward_mixed_without_input_grad"}, X, adapters, G,
                    nullptr, ws);
  }

 public:
  /// Sets the gradients of every adapter to zero.
  void zero_grad() {
    for (auto& e : entries_) e->adapter.zero_grad();
  }

  // ---- merge -----------------------------------------------------------------------------------

  /// Folds the active adapter's s*B*A into the weight so that forward costs exactly a dense layer;
  /// a no-op when merged. Throws std::logic_error without an active adapter, std::domain_error
  /// (weight untouched) if A, B or s is not finite or if the merged weight is not finite in the
  /// storage's type where W0 was.
  void merge() {
    if (is_merged()) return;
    const Entry& e = active_entry("merge");
    require_mergeable(detail::Where{face_, "merge"}, e);
    // Keep the factors merged (no allocation after the first merge of this shape): unmerge
    // subtracts exactly these, whatever happens to the adapter meanwhile.
    merged_.scaling = e.adapter.scaling();
    merged_.A = e.adapter.A();
    merged_.B = e.adapter.B();
    frozen_.merge(merged_.scaling, merged_.B, merged_.A, Vector());
  }

  /// Gives W0 back (bit-exact with MergeMode::ExactRestore; within MergeMode::InPlace's bound
  /// otherwise), removing exactly the factors merge() folded in. A no-op when not merged.
  void unmerge() {
    if (!is_merged()) return;
    frozen_.unmerge(merged_.scaling, merged_.B, merged_.A, Vector());
  }

  bool is_merged() const { return frozen_.is_merged(); }

  // ---- numerical health ------------------------------------------------------------------------

  /// True when every adapter (A, B, gradients, lora bias), the bias and the weight in use hold no
  /// NaN or infinity. O(d k) for the weight, allocation-free.
  bool all_finite() const {
    for (const auto& e : entries_)
      if (!e->adapter.all_finite()) return false;
    return bias_.allFinite() && frozen_.all_finite();
  }

  /// Throws std::domain_error naming the first NaN or infinity (adapter, matrix, element, value)
  /// among the adapters, the bias and the weight in use. Call it after backward() and before the
  /// optimizer step to stop a diverging run where it starts. The library never lets a non-finite
  /// value reach W0 by itself: merge() refuses a non-finite adapter and an overflowing sum.
  void check_finite() const {
    const detail::Where where{face_, "check_finite"};
    for (const auto& e : entries_) {
      if (e->adapter.all_finite()) continue;
      const std::string what = detail::concat(where, ": adapter \"", e->name, "\"");
      e->adapter.check_finite(what.c_str());
    }
    detail::require_finite(where, "bias", bias_);
    if (!frozen_.all_finite())
      detail::require_finite(where, is_merged() ? "merged weight" : "W0", frozen_.weight());
  }

 protected:
  struct Entry {
    std::string name;
    Adapter adapter;
  };

  const Entry& entry(int i) const { return *entries_[static_cast<std::size_t>(i)]; }
  Entry& entry(int i) { return *entries_[static_cast<std::size_t>(i)]; }
  int active_index() const { return active_; }
  const char* face() const { return face_; }

 private:
  // Keeps the dropout stream apart from A's draw, which uses config.seed itself.
  static constexpr std::uint64_t kDropoutSeedOffset = 0x6c6f72615f64726fULL;  // "lora_dro"

  /// The factors folded into the weight by the last merge() (valid while merged).
  struct MergedFactors {
    T scaling{};
    Matrix A, B;
  };

  int find(const std::string& name) const {
    for (std::size_t i = 0; i < entries_.size(); ++i)
      if (entries_[i]->name == name) return static_cast<int>(i);
    return -1;
  }

  int index_or_throw(const char* method, const std::string& name) const {
    const int i = find(name);
    if (i < 0) {
      std::string known;
      for (const auto& e : entries_) known += (known.empty() ? "\"" : ", \"") + e->name + "\"";
      throw std::invalid_argument(
          detail::concat(detail::Where{face_, method}, ": no adapter named \"", name,
                         "\" (adapters: ", known.empty() ? "none" : known, ")"));
    }
    return i;
  }

  const Entry& active_entry(const char* method) const {
    detail::require_state(active_ >= 0, detail::Where{face_, method},
                          ": no adapter is active; call set_active");
    return entry(active_);
  }

  void require_fits(const detail::Where& where, const std::string& name, const Adapter& a) const {
    detail::require(a.out_features() == out_features() && a.in_features() == in_features(), where,
                    ": adapter \"", name, "\" is for a ",
                    detail::shape_string(a.out_features(), a.in_features()),
                    " weight, this layer's W0 is ",
                    detail::shape_string(out_features(), in_features()));
  }

  void require_mergeable(const detail::Where& where, const Entry& e) const {
    if (!std::isfinite(static_cast<double>(e.adapter.scaling())) || !e.adapter.A().allFinite() ||
        !e.adapter.B().allFinite())
      throw std::domain_error(detail::concat(where, ": adapter \"", e.name,
                                             "\": A, B and the scaling must be finite; the weight "
                                             "was left as it was"));
  }

  /// A forward while merged must not serve a stale merge: O(r (d + k)) comparisons.
  void require_merge_current(const detail::Where& where) const {
    const Adapter& a = entry(active_).adapter;
    const bool current = a.scaling() == merged_.scaling && a.A() == merged_.A && a.B() == merged_.B;
    detail::require_state(current, where, ": adapter \"", entry(active_).name,
                          "\" changed after merge() (an optimizer step or a write through A() or "
                          "B() while merged); call unmerge(), which removes exactly what was "
                          "merged, then merge() again");
  }

  /// The active adapter, for a call that trains it: throws while merged or with none active.
  Adapter& trainable_active(const detail::Where& where) {
    detail::require_state(active_ >= 0, where, ": no adapter is active; call set_active");
    detail::require_state(!is_merged(), where,
                          ": the layer is merged; call unmerge() before training the adapter");
    return entry(active_).adapter;
  }

  /// H = W X + b: the frozen layer alone, (d x k)(k x n).
  void base_forward(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H) const {
    if (has_bias()) {
      H.colwise() = bias_;
      frozen_.multiply_add(X, H);
    } else {
      frozen_.multiply(X, H);
    }
  }

  // ---- dropout ---------------------------------------------------------------------------------

  /// Draws M (k x n) with p(j) for column j into storage that grows and never shrinks (no
  /// allocation once grown). Columns with p = 0 are all ones and draw nothing.
  template <typename P>
  void draw_dropout_mask(Index n, P p_of_column) const {
    const Index k = in_features();
    if (mask_storage_.size() < k * n) mask_storage_.resize(k * n);
    mask_rows_ = k;
    mask_cols_ = n;
    for (Index j = 0; j < n; ++j) {
      const double p = p_of_column(j);
      T* col = mask_storage_.data() + j * k;
      if (p <= 0) {
        std::fill(col, col + k, T(1));
        continue;
      }
      const T keep_scale = static_cast<T>(1.0 / (1.0 - p));
      for (Index i = 0; i < k; ++i) col[i] = dropout_rng_.uniform() < p ? T(0) : keep_scale;
    }
  }

  /// ws MaskedInput := M .* X (k x n), with the mask of the matching forward.
  Eigen::Map<Matrix> masked_input(const detail::Where& where, const Eigen::Ref<const Matrix>& X,
                                  WorkspaceType& ws) const {
    require_mask_for(where, X.cols());
    auto Xd = ws.get(Slot::MaskedInput, in_features(), X.cols());
    Xd = X.cwiseProduct(dropout_mask());
    return Xd;
  }

  void require_mask_for(const detail::Where& where, Index n) const {
    detail::require_state(mask_rows_ == in_features() && mask_cols_ == n, where,
                          ": dropout is on, but no training-mode forward with a batch of ", n,
                          " columns preceded it (the last mask is ",
                          detail::shape_string(mask_rows_, mask_cols_), ")");
  }

  // ---- mixed batches ---------------------------------------------------------------------------

  void require_mixed_args(const detail::Where& where, const Eigen::Ref<const Matrix>& X,
                          const std::vector<int>& adapters) const {
    detail::require_state(!is_merged(), where,
                          ": the layer is merged; call unmerge() before a mixed-adapter batch");
    detail::require(static_cast<Index>(adapters.size()) == X.cols(), where, ": ", X.cols(),
                    " columns in X but ", adapters.size(), " adapter indices");
    const int count = static_cast<int>(entries_.size());
    for (std::size_t j = 0; j < adapters.size(); ++j)
      detail::require(adapters[j] == kNoAdapter || (adapters[j] >= 0 && adapters[j] < count), where,
                      ": column ", j, " names adapter ", adapters[j], "; valid are 0..", count - 1,
                      " and kNoAdapter (-1)");
  }

  double column_dropout(const std::vector<int>& adapters, Index j) const {
    const int a = adapters[static_cast<std::size_t>(j)];
    return a == kNoAdapter ? 0.0 : entry(a).adapter.config().dropout;
  }

  bool mixed_dropout_active(const std::vector<int>& adapters) const {
    if (!training_) return false;
    for (int a : adapters)
      if (a != kNoAdapter && entry(a).adapter.config().dropout > 0) return true;
    return false;
  }

  static Index column_count(const std::vector<int>& adapters, int a) {
    Index n = 0;
    for (int idx : adapters) n += idx == a;
    return n;
  }

  /// ws GatheredInput := the columns of adapter a (masked with the dropout mask when `masked`).
  Eigen::Map<Matrix> gather_input(const Eigen::Ref<const Matrix>& X,
                                  const std::vector<int>& adapters, int a, Index n_a, bool masked,
                                  WorkspaceType& ws) const {
    auto Xa = ws.get(Slot::GatheredInput, in_features(), n_a);
    const auto M = dropout_mask();
    for (Index j = 0, c = 0; j < X.cols(); ++j) {
      if (adapters[static_cast<std::size_t>(j)] != a) continue;
      if (masked) {
        Xa.col(c++) = X.col(j).cwiseProduct(M.col(j));
      } else {
        Xa.col(c++) = X.col(j);
      }
    }
    return Xa;
  }

  /// Writes the columns of `part` (one adapter's, in order) to their places in `out`.
  template <typename Part>
  static void scatter(const Part& part, const std::vector<int>& adapters, int a,
                      Eigen::Ref<Matrix> out) {
    for (Index j = 0, c = 0; j < out.cols(); ++j)
      if (adapters[static_cast<std::size_t>(j)] == a) out.col(j) = part.col(c++);
  }

  /// Each adapter's gradients from its own columns; with dX, its term of dX written to its
  /// columns (kNoAdapter columns zeroed) for the frozen product to accumulate onto.
  void mixed_gradients(const detail::Where& where, const Eigen::Ref<const Matrix>& X,
                       const std::vector<int>& adapters, const Eigen::Ref<const Matrix>& G,
                       Eigen::Ref<Matrix>* dX, WorkspaceType& ws) {
    require_mixed_args(where, X, adapters);
    detail::require_backward_args(where, X, G, out_features(), in_features());
    const bool dropout = mixed_dropout_active(adapters);
    if (dropout) require_mask_for(where, X.cols());
    for (int a = 0; a < static_cast<int>(entries_.size()); ++a) {
      const Index n_a = column_count(adapters, a);
      if (n_a == 0) continue;
      Adapter& ad = entry(a).adapter;
      auto Xa = gather_input(X, adapters, a, n_a, dropout, ws);   // k x n_a
      auto Ga = ws.get(Slot::GatheredGrad, out_features(), n_a);  // d x n_a
      for (Index j = 0, c = 0; j < X.cols(); ++j)
        if (adapters[static_cast<std::size_t>(j)] == a) Ga.col(c++) = G.col(j);
      auto BtG = ws.get(Slot::BackProjected, ad.rank(), n_a);
      ad.accumulate_gradients(Xa, Ga, ws.get(Slot::LowRank, ad.rank(), n_a), BtG);
      if (dX == nullptr) continue;
      auto dXa = ws.get(Slot::GatheredOutput, in_features(), n_a);
      ad.assign_input_gradient(BtG, dXa);  // s A^T (B^T G_a): (k x r)(r x n_a)
      scatter(dXa, adapters, a, *dX);
    }
    if (dX == nullptr) return;
    const auto M = dropout_mask();
    for (Index j = 0; j < X.cols(); ++j) {
      if (adapters[static_cast<std::size_t>(j)] == kNoAdapter) {
        dX->col(j).setZero();
      } else if (dropout) {
        dX->col(j).array() *= M.col(j).array();  // the adapter saw M .* X
      }
    }
  }

  Frozen frozen_;
  Vector bias_;
  std::vector<std::unique_ptr<Entry>> entries_;  // stable addresses: add_adapter returns a ref
  int active_ = -1;
  MergedFactors merged_;
  bool training_ = true;
  const char* face_;
  // LoRA dropout state, written by a training-mode forward (see train()).
  mutable Rng dropout_rng_{kDropoutSeedOffset};
  mutable Vector mask_storage_;
  mutable Index mask_rows_ = 0, mask_cols_ = 0;
};

}  // namespace lora
