// AdapterLayer<T, Frozen>: the one implementation of a LoRA layer. A frozen linear layer
// (W0: d x k in a frozen storage, optional bias b) carrying a set of named LoRA adapters, one of
// which may be active:
//   H = W0 X + b + s B (A X)                      (the paper's Eq. 3, a column per sample)
// or, for a DoRA adapter (config().use_dora, arXiv 2402.09353; docs/dora.md),
//   H = (m / ||W0 + s B A||_row) .* (W0 X + s B (A X)) + b
// LoRALinear (one adapter) and MultiLoRALinear (many, mixed batches) are faces of this class: both
// derive from it, the public members here are theirs, and MultiLoRALinear also makes public the
// multi-adapter members (the "protected:" blocks). Every feature (dropout, train/eval, the
// out-parameter API, merge modes, finite checks, parameter views, every frozen storage) is
// written here once. docs/design.md describes the data flow.
#pragma once

#include "lora/adapter.hpp"
#include "lora/config.hpp"
#include "lora/dense_frozen_weight.hpp"
#include "lora/detail/base_init_hook.hpp"
#include "lora/detail/check.hpp"
#include "lora/detail/finite.hpp"
#include "lora/detail/segmented_low_rank.hpp"
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
/// threads at once, except a training-mode forward with LoRA dropout or a DoRA adapter (see
/// train()); anything that changes the layer needs exclusive access.
///
/// Merge guarantee: merge() keeps a copy of the factors it folded in (r (d + k) numbers), and
/// unmerge() removes exactly those, whatever happened to the adapter in between (an optimizer step,
/// a write through a held reference, a replaced adapter). A forward while merged checks that the
/// active adapter still equals what was merged, and throws std::logic_error if not, so a merged
/// layer never silently serves a stale adapter.
template <typename T, typename Frozen = DenseFrozenWeight<T>>
class AdapterLayer {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "lora: layers support T = float or T = double only; convert the weight first, "
                "e.g. W.cast<float>() (W.template cast<float>() inside a template).");
  static_assert(check_frozen_storage<Frozen>());
  static_assert(std::is_same_v<typename Frozen::Scalar, T>,
                "lora: the layer's T must be its frozen storage's Scalar (e.g. "
                "LoRALinear<float, Bf16FrozenWeight>).");

 public:
  using Scalar = T;                                                 ///< float or double
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;  ///< a dense T matrix
  using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;               ///< a dense T vector
  using Index = Eigen::Index;                                       ///< Eigen's index type
  using Adapter = LoRAAdapter<T>;                                   ///< the trainable half
  using WorkspaceType = Workspace<T>;  ///< scratch for the out-parameter calls
  using FrozenStorage = Frozen;        ///< the storage of W0 (see frozen_storage.hpp)

 protected:
  // The multi-adapter part of the API (this block and the two below, marked "protected:"):
  // MultiLoRALinear re-exports it with `using`; LoRALinear, a layer of one adapter, keeps it
  // hidden. Everything public here is public in both faces, written once.

  /// Marks a column of a mixed batch that gets no adapter (the base output only).
  static constexpr int kNoAdapter = -1;

  /// Wraps a frozen storage and a frozen bias (length d, or empty); `face` names the class in
  /// error messages.
  AdapterLayer(Frozen frozen, Vector bias, const char* face);

 public:
  /// A deep copy: the copy's adapters, parameter views and frozen storage are its own.
  AdapterLayer(const AdapterLayer& o);
  /// As the copy constructor.
  AdapterLayer& operator=(const AdapterLayer& o);
  /// Moves the layer; parameter views of its adapters stay valid.
  AdapterLayer(AdapterLayer&&) noexcept = default;
  /// As the move constructor.
  AdapterLayer& operator=(AdapterLayer&&) noexcept = default;

  // ---- the frozen side -------------------------------------------------------------------------

  Index in_features() const { return frozen_.in_features(); }    ///< k
  Index out_features() const { return frozen_.out_features(); }  ///< d
  /// The frozen storage of W0.
  const Frozen& frozen() const { return frozen_; }
  /// True when the layer has a frozen bias.
  bool has_bias() const { return bias_.size() != 0; }
  const Vector& bias() const { return bias_; }  ///< length d, or empty
  /// The weight in use as a new d x k matrix: W0, or W0 + s B A of the merged adapter.
  Matrix weight() const { return frozen_.weight(); }
  /// Frozen parameters: d * k, plus d with a bias.
  Index frozen_parameter_count() const { return out_features() * in_features() + bias_.size(); }

 protected:
  // ---- adapters --------------------------------------------------------------------------------

  /// Adds a fresh adapter (A drawn as cfg says, B = 0; with cfg.use_dora, m = the row norms of W0,
  /// PEFT's initialisation) named `name` and returns it.
  Adapter& add_adapter(const std::string& name, const LoRAConfig& cfg);

  /// As above for a PiSSA, OLoRA or LoftQ config, factoring `original`: the full-precision W0
  /// the storage was built from (d x k). A bf16 or 4-bit storage has rounded W0; PiSSA and OLoRA
  /// without it factor the weight as stored, LoftQ needs it.
  Adapter& add_adapter(const std::string& name, const LoRAConfig& cfg,
                       const Eigen::Ref<const Matrix>& original);

  /// As above, forming the residual in `original` itself (a d x k matrix the caller gives up).
  Adapter& add_adapter(const std::string& name, const LoRAConfig& cfg, Matrix&& original);

  /// Adds `adapter` (for this layer's d x k weight) under `name`. Throws std::invalid_argument for
  /// an empty name, a name already in use or a shape mismatch. Does not change the active adapter.
  /// A DoRA adapter whose magnitude_pending() gets m = the row norms of W0; the first DoRA adapter
  /// measures them (O(d k), once: std::logic_error if the layer is merged then). A PiSSA, OLoRA or
  /// LoftQ adapter whose init_pending() takes its factors from W0, and W0 becomes the residual
  /// (lora/init.hpp): the base is shared, so every adapter of the layer sees the new W0, as in
  /// PEFT. Throws std::logic_error for that while merged, or when the program does not include
  /// <lora/base_init.hpp> in any of its files (which compiles those inits).
  Adapter& add_adapter(const std::string& name, Adapter adapter);

 private:
  Adapter& add_adapter_from(const std::string& name, Adapter adapter,
                            const Eigen::Ref<const Matrix>* original, Matrix* owned = nullptr);

 protected:
  /// Removes adapter `name`. If it is merged, its delta is first removed from the weight; if it is
  /// active, no adapter is active afterwards. Indices of later adapters shift down by one.
  void remove_adapter(const std::string& name);

  /// Gives adapter `name` the values of `adapter` (rank, scaling and tensors), copying into the
  /// existing storage where the shapes agree, so optimizer views taken earlier stay valid and see
  /// the new values; a tensor of another shape is reallocated and its old views become stale.
  /// Throws std::logic_error while that adapter is merged, std::invalid_argument for a shape that
  /// does not fit W0.
  void replace_adapter(const std::string& name, const Adapter& adapter);

  /// True when an adapter named `name` exists.
  bool has_adapter(const std::string& name) const { return find(name) >= 0; }
  /// The number of adapters.
  std::size_t adapter_count() const { return entries_.size(); }

  /// Names in the order added: the index of a name here is its adapter_index.
  std::vector<std::string> adapter_names() const;

  /// The index of `name` for mixed batches (its position in adapter_names()).
  int adapter_index(const std::string& name) const { return index_or_throw("adapter_index", name); }

  /// Adapter `name` (std::invalid_argument, listing the names, when there is none).
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
  /// Trainable parameters of every adapter: the sum of r * (d + k) (+ d with a lora bias, + d for
  /// DoRA's magnitude).
  Index trainable_parameter_count() const;

 protected:
  // ---- the active adapter ----------------------------------------------------------------------

  /// Makes `name` the adapter forward and backward use. While unmerged this is O(1) and W0 is not
  /// touched; while merged, the old adapter is unmerged and the new one merged (throws
  /// std::domain_error, changing nothing, when the new adapter is not finite or its merge would
  /// overflow).
  void set_active(const std::string& name);

  /// No adapter: forward gives the base output W0 X + b. Unmerges first if merged.
  void disable();

  /// True when an adapter is active.
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
  /// concurrently with any other call on the same layer. So does a training-mode forward with a
  /// DoRA adapter, which keeps what its backward needs (see forward()).
  void train(bool on = true) { training_ = on; }
  /// Evaluation mode: no dropout; forward is deterministic and thread-safe.
  void eval() { training_ = false; }
  /// True in training mode.
  bool is_training() const { return training_; }

  /// PEFT's `requires_grad_(False)` on this layer's adapters: with `false`, a backward still
  /// returns dL/dX through the adapter (the layer keeps adapting its output) but leaves every
  /// adapter's gradients as they were, and the *_without_input_grad backwards do nothing. For a
  /// run that trains other layers through this one (a frozen K or O projection of an attention
  /// block). The backward runs as usual, so dX is exactly a trainable layer's; the gradients are
  /// put back afterwards (O(r (d + k)) copies per adapter, no allocation once grown). Leave the
  /// layer's parameters out of the optimizer too, or its weight decay still moves them.
  void set_requires_grad(bool on) { requires_grad_ = on; }
  /// False after set_requires_grad(false): backward returns dX only.
  bool requires_grad() const { return requires_grad_; }
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
  /// With a DoRA adapter H = c .* (W0 X + s B (A X)) + b, c = m / ||W0 + s B A||_row, at the cost
  /// of r more output columns of the frozen product (the norms; no d x k matrix). In training mode
  /// the layer then keeps the normalised direction's output and c for backward (d x n: no second
  /// dense product there), which makes that forward a writer like dropout's (see train()).
  Matrix forward(const Eigen::Ref<const Matrix>& X) const;

  /// As above into H (d x n, must not overlap X); allocation-free once ws has grown.
  void forward(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H, WorkspaceType& ws) const;

 protected:
  /// A mixed-adapter batch: column j of X goes through adapter `adapters[j]` (an adapter_index, or
  /// kNoAdapter for the base alone), whatever is active. One W0 X product serves the whole batch;
  /// the columns are grouped by adapter (one counting sort) and each adapter's segment goes
  /// through its low-rank factors once (detail/segmented_low_rank.hpp): O(d k n) +
  /// O(sum_a r_a (d + k) n_a), each adapter's A and B read once, whatever the order of the
  /// columns. In training mode each column gets its adapter's dropout.
  /// Throws std::logic_error while merged (the weight then holds one adapter's delta),
  /// std::invalid_argument for a bad index.
  Matrix forward_mixed(const Eigen::Ref<const Matrix>& X, const std::vector<int>& adapters) const;

  /// As above into H (d x n, must not overlap X); allocation-free once ws has grown.
  void forward_mixed(const Eigen::Ref<const Matrix>& X, const std::vector<int>& adapters,
                     Eigen::Ref<Matrix> H, WorkspaceType& ws) const;

 public:
  // ---- backward --------------------------------------------------------------------------------

  /// Accumulates the active adapter's gradients for G = dL/dH (d x n) and returns dL/dX (k x n):
  ///   dX = W0^T G + s A^T (B^T G).
  /// A DoRA adapter holds its norms constant (as PEFT does): with c = m / ||W0 + s B A||_row and
  /// Gc = c .* G, dA and dB are LoRA's with Gc, dm += rowsum(G .* Z / ||W||), dX = W^T Gc. It uses
  /// what the training-mode forward kept when that forward had this X and the adapter is unchanged
  /// since (checked: O(k n + r (d + k))), and recomputes Z (one more dense product) otherwise.
  /// X must be the input of the matching forward. Throws std::logic_error while merged or with no
  /// active adapter.
  Matrix backward(const Eigen::Ref<const Matrix>& X, const Eigen::Ref<const Matrix>& G);

  /// As above into dX (k x n, must not overlap X or G); allocation-free once ws has grown.
  void backward(const Eigen::Ref<const Matrix>& X, const Eigen::Ref<const Matrix>& G,
                Eigen::Ref<Matrix> dX, WorkspaceType& ws);

  /// Accumulates the active adapter's gradients only, for a first layer whose input needs no
  /// gradient: O(n r (d + k)), none of the d x k work of dX.
  void backward_without_input_grad(const Eigen::Ref<const Matrix>& X,
                                   const Eigen::Ref<const Matrix>& G, WorkspaceType& ws);

  /// As above, with a workspace of its own (allocates).
  void backward_without_input_grad(const Eigen::Ref<const Matrix>& X,
                                   const Eigen::Ref<const Matrix>& G);

 protected:
  /// The backward of forward_mixed: each adapter accumulates its gradients from its own columns
  /// (exactly as if its columns had run alone), and dX = W0^T G + the adapters' terms (columns
  /// with kNoAdapter: W0^T G only). Throws std::logic_error while merged.
  Matrix backward_mixed(const Eigen::Ref<const Matrix>& X, const std::vector<int>& adapters,
                        const Eigen::Ref<const Matrix>& G);

  /// As above into dX (k x n, must not overlap X or G); allocation-free once ws has grown.
  void backward_mixed(const Eigen::Ref<const Matrix>& X, const std::vector<int>& adapters,
                      const Eigen::Ref<const Matrix>& G, Eigen::Ref<Matrix> dX, WorkspaceType& ws);

  /// The adapters' gradients of a mixed batch, without dX.
  void backward_mixed_without_input_grad(const Eigen::Ref<const Matrix>& X,
                                         const std::vector<int>& adapters,
                                         const Eigen::Ref<const Matrix>& G, WorkspaceType& ws);

 public:
  /// Sets the gradients of every adapter to zero.
  void zero_grad();

  // ---- merge -----------------------------------------------------------------------------------

  /// Folds the active adapter's s*B*A into the weight so that forward costs exactly a dense layer;
  /// a no-op when merged. A DoRA adapter merges W = diag(m / ||W0 + s B A||) (W0 + s B A). Throws
  /// std::logic_error without an active adapter, std::domain_error (weight untouched) if A, B or s
  /// is not finite or if the merged weight is not finite in the storage's type where W0 was.
  void merge();

  /// Gives W0 back (bit-exact with MergeMode::ExactRestore; within MergeMode::InPlace's bound
  /// otherwise), removing exactly the factors merge() folded in. A no-op when not merged.
  void unmerge();

  /// True while the active adapter is merged into the weight.
  bool is_merged() const { return frozen_.is_merged(); }

  // ---- numerical health ------------------------------------------------------------------------

  /// True when every adapter (A, B, gradients, lora bias), the bias and the weight in use hold no
  /// NaN or infinity. O(d k) for the weight, allocation-free.
  bool all_finite() const;

  /// Throws std::domain_error naming the first NaN or infinity (adapter, matrix, element, value)
  /// among the adapters, the bias and the weight in use. Call it after backward() and before the
  /// optimizer step to stop a diverging run where it starts. The library never lets a non-finite
  /// value reach W0 by itself: merge() refuses a non-finite adapter and an overflowing sum.
  void check_finite() const;

 protected:
  /// A named adapter.
  struct Entry {
    std::string name;  ///< its name
    Adapter adapter;   ///< its tensors
  };

  /// The i-th adapter (no check: the faces pass valid indices).
  const Entry& entry(int i) const { return *entries_[static_cast<std::size_t>(i)]; }
  /// The i-th adapter (no check: the faces pass valid indices).
  Entry& entry(int i) { return *entries_[static_cast<std::size_t>(i)]; }
  /// The index of the active adapter, or -1.
  int active_index() const { return active_; }
  /// The face's name, for messages.
  const char* face() const { return face_; }

 private:
  // Keeps the dropout stream apart from A's draw, which uses config.seed itself.
  static constexpr std::uint64_t kDropoutSeedOffset = 0x6c6f72615f64726fULL;  // "lora_dro"

  /// Puts every adapter's gradients back as they were when it was made, for a backward of a layer
  /// whose adapters do not require gradients (set_requires_grad(false)); does nothing otherwise.
  /// Restores on the way out of an exception too.
  class GradientKeeper {
   public:
    explicit GradientKeeper(AdapterLayer& layer);
    ~GradientKeeper();
    GradientKeeper(const GradientKeeper&) = delete;
    GradientKeeper& operator=(const GradientKeeper&) = delete;

   private:
    template <typename M>
    static void copy(const M& from, Vector& to) {
      if (to.size() < from.size()) to.resize(from.size());  // grown, never shrunk
      to.head(from.size()) = Eigen::Map<const Vector>(from.data(), from.size());
    }
    template <typename M>
    static void put(const Vector& from, M& to) {
      Eigen::Map<Vector>(to.data(), to.size()) = from.head(to.size());
    }
    AdapterLayer* layer_;
  };

  /// The factors folded into the weight by the last merge() (valid while merged): for DoRA also
  /// m (for the stale-merge check) and the row scale g = m / ||W0 + s B A|| (for unmerge).
  struct MergedFactors {
    T scaling{};
    Matrix A, B;
    Vector m, g;
  };

  int find(const std::string& name) const;

  int index_or_throw(const char* method, const std::string& name) const;

 protected:
  // The checks the faces that bring their own input kinds (LoRAEmbedding's token ids) share with
  // forward, backward and merge here.

  /// The active entry; throws std::logic_error naming `method` when none is active.
  const Entry& active_entry(const char* method) const;

  /// Throws std::invalid_argument unless `a` fits this layer's d x k weight.
  void require_fits(const detail::Where& where, const std::string& name, const Adapter& a) const;

  /// Throws std::domain_error unless e's A, B, scaling and magnitude are finite.
  void require_mergeable(const detail::Where& where, const Entry& e) const;

  /// A forward while merged must not serve a stale merge: O(r (d + k)) comparisons.
  void require_merge_current(const detail::Where& where) const;

  /// The active adapter, for a call that trains it: throws while merged or with none active.
  Adapter& trainable_active(const detail::Where& where);

 private:
  /// H = W X + b: the frozen layer alone, (d x k)(k x n).
  void base_forward(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H) const;

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
                                  WorkspaceType& ws) const;

  void require_mask_for(const detail::Where& where, Index n) const;

  // ---- mixed batches ---------------------------------------------------------------------------

  void require_mixed_args(const detail::Where& where, const Eigen::Ref<const Matrix>& X,
                          const std::vector<int>& adapters) const;

  double column_dropout(const std::vector<int>& adapters, Index j) const {
    const int a = adapters[static_cast<std::size_t>(j)];
    return a == kNoAdapter ? 0.0 : entry(a).adapter.config().dropout;
  }

  bool mixed_dropout_active(const std::vector<int>& adapters) const;

  static Index column_count(const std::vector<int>& adapters, int a) {
    Index n = 0;
    for (int idx : adapters) n += idx == a;
    return n;
  }

  /// ws GatheredInput := the columns of adapter a (masked with the dropout mask when `masked`).
  Eigen::Map<Matrix> gather_input(const Eigen::Ref<const Matrix>& X,
                                  const std::vector<int>& adapters, int a, Index n_a, bool masked,
                                  WorkspaceType& ws) const;

  /// Writes the columns of `part` (one adapter's, in order) to their places in `out`.
  template <typename Part>
  static void scatter(const Part& part, const std::vector<int>& adapters, int a,
                      Eigen::Ref<Matrix> out) {
    for (Index j = 0, c = 0; j < out.cols(); ++j)
      if (adapters[static_cast<std::size_t>(j)] == a) out.col(j) = part.col(c++);
  }

  /// Each adapter's gradients from its own columns; with dX, its term of dX written to its
  /// columns (kNoAdapter columns zeroed) for the frozen product to accumulate onto. Returns true
  /// when that product must take the DoraOutputGrad slot (G with the DoRA columns as c .* G)
  /// instead of G.
  bool mixed_gradients(const detail::Where& where, const Eigen::Ref<const Matrix>& X,
                       const std::vector<int>& adapters, const Eigen::Ref<const Matrix>& G,
                       Eigen::Ref<Matrix>* dX, WorkspaceType& ws);

  // ---- DoRA (docs/dora.md) ---------------------------------------------------------------------

  /// A fresh DoRA row norm below 1/kDoraMaxCancellation of the sum of its terms' magnitudes is
  /// recomputed exactly (see dora_scales): the accepted ones lose at most log2(16) = 4 bits to
  /// cancellation beyond the precision of their terms.
  static constexpr double kDoraMaxCancellation = 16.0;

  static bool same(const Matrix& a, const Matrix& b) {
    return a.rows() == b.rows() && a.cols() == b.cols() && a == b;
  }
  static bool same(const Vector& a, const Vector& b) { return a.size() == b.size() && a == b; }

  bool mixed_uses_dora(const std::vector<int>& adapters) const;

  /// For a PiSSA, OLoRA or LoftQ adapter joining the layer: its factors from W0, W0 rebased to the
  /// residual (lora/base_init.hpp); DoRA's row norms of W0, if measured, are measured again.
  void prepare_base_init(const detail::Where& where, Adapter& a,
                         const Eigen::Ref<const Matrix>* original, Matrix* owned = nullptr);

  /// For a DoRA adapter joining the layer: measures ||row i of W0||^2 once (as stored, in double)
  /// and sets a pending magnitude to the row norms of W0 (PEFT's initialisation).
  void prepare_dora(const detail::Where& where, Adapter& a);

  /// DoRA's row scales of adapter a into sc (d x 2): sc.col(0) = m and sc.col(1) = 1 / ||W0 + s B
  /// A||_row (0 for a zero row, whose direction is zero: its output is the bias and its gradients
  /// vanish, where PEFT divides 0 by 0). The row scale c = m / ||W|| is formed in double where it
  /// is used (dora_scale_col), so a c beyond T's range still scales z / ||W|| to a finite output.
  /// No d x k matrix is formed:
  ///   ||w_i + s b_i A||^2 = ||w_i||^2 + 2 s b_i . (A w_i) + s^2 b_i (A A^T) b_i^T
  /// with ||w_i||^2 measured once (prepare_dora), A w_i from the storage's own product W0 A^T
  /// (d x r: r more output columns) and the r x r Gram matrix A A^T; the sum is taken in double.
  /// When it cancels (below 1/16 of |first| + |second| + |third|: the update removes most of the
  /// row) or a term is not finite (A A^T or W0 A^T overflowing T: the norm itself may be small)
  /// the row is recomputed exactly from the row as stored (dora_exact_norms).
  void dora_scales(const Adapter& a, WorkspaceType& ws, Eigen::Ref<Matrix> sc) const;

  /// As dora_scales, with P = W0 A^T (d x r) already computed (dora_forward gets it from the
  /// forward's own product).
  void dora_scales_from(const Adapter& a, const Eigen::Ref<const Matrix>& P, WorkspaceType& ws,
                        Eigen::Ref<Matrix> sc) const;

  static void set_dora_scale(Eigen::Ref<Matrix> sc, Index i, T m, double norm) {
    sc(i, 0) = m;
    sc(i, 1) = static_cast<T>(norm > 0 ? 1.0 / norm : 0.0);
  }

  /// out = c .* v with c = m / ||W|| = sc.col(0) .* sc.col(1), all in double (c may exceed T's
  /// range where c .* v does not), rounded to T once.
  template <typename Out, typename V>
  static void dora_scale_col(Out out, const Eigen::Ref<const Matrix>& sc, const V& v) {
    out = (sc.col(0).template cast<double>().array() *
           (v.template cast<double>().array() * sc.col(1).template cast<double>().array()))
              .template cast<T>()
              .matrix();
  }

  /// The rows marked in sc (col 1 < 0): ||w_i + s b_i A|| summed in double over the row of W0 as
  /// stored, which the storage's own transposed product with unit vectors gives exactly (1 and 0
  /// are exact in every input format). O(d k q) for q rows: a q-column product.
  void dora_exact_norms(const Adapter& a, Index q, WorkspaceType& ws, Eigen::Ref<Matrix> sc) const;

  /// DoRA's forward with the active adapter a. With Z = W0 X + s B (A X) and c, 1/||W|| from
  /// dora_scales:  H = c .* Z + b. The norms need W0 A^T (d x r): A^T rides along as r more columns
  /// of the forward's own product, W0 [X, A^T], since a product of its own would pack all of W0
  /// again for r columns. Under LoRA dropout PEFT feeds the dropped input Xd = M .* X to the scaled
  /// base term as well:
  ///   H = W0 X + b + (c - 1) .* (W0 Xd) + c .* (s B A Xd) = c .* Zd + b - W0 Xd + W0 X,
  /// a second dense product, as in PEFT. In training mode the tape keeps Z / ||W|| and c.
  void dora_forward(const Adapter& a, const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H,
                    WorkspaceType& ws) const;

  /// One column z of a DoRA output (Z, or Zd under dropout) becomes c .* z + b (minus W0 xd, the
  /// `base` column, under dropout: the frozen product adds W0 x after); with tape_col >= 0 the tape
  /// keeps z / ||W|| for dm. One pass over the column while it is in cache.
  template <typename Col>
  void dora_finish_column(Col z, const Eigen::Ref<const Matrix>& sc, Index tape_col) const {
    if (tape_col >= 0) tape_direction().col(tape_col) = z.cwiseProduct(sc.col(1));
    dora_scale_col(z, sc, z);  // c .* z (elementwise: z may be read as it is written)
    if (has_bias()) z += bias_;
  }
  template <typename Col, typename Base>
  void dora_finish_column(Col z, const Eigen::Ref<const Matrix>& sc, Index tape_col,
                          const Base& base) const {
    dora_finish_column(z, sc, tape_col);
    z -= base;
  }

  /// DoRA's backward over one group of columns (the whole batch, or one adapter's columns of a
  /// mixed batch): Xin is the adapter's input (M .* X under dropout), X the batch as given to
  /// forward, G the group's output gradient. With the norm held constant and Gc = c .* G:
  ///   dm += rowsum(G .* Zn)   (Zn = Z / ||W||, from the tape or recomputed)
  ///   dA, dB: LoRA's with Gc;   with dXa: dXa = s A^T (B^T Gc) (+ W0^T ((c - 1) .* G) under
  ///   dropout, the scaled base term's share). Returns Gc (d x n, DoraScaledGrad slot; without
  ///   dropout the caller's frozen product takes it: dX = W0^T Gc + dXa).
  Eigen::Map<Matrix> dora_gradients(Adapter& ad, int index, const Eigen::Ref<const Matrix>& Xin,
                                    const Eigen::Ref<const Matrix>& X,
                                    const Eigen::Ref<const Matrix>& G,
                                    const std::vector<int>* adapters, Eigen::Ref<Matrix>* dXa,
                                    bool dropout, WorkspaceType& ws);

  // DoRA's tape: what a training-mode forward keeps for backward (the batch X, which adapter each
  // column went through, Z / ||W|| per column, and per adapter 1 / ||W|| and the values it was
  // computed from). A backward uses it only when X, the adapter and the columns routed to it are
  // unchanged, and recomputes otherwise: never a stale or unwritten gradient.

  void forget_tape() { tape_n_ = -1; }

  /// Starts the tape of a forward over X and returns its copy of X, k x (n + extra): the extra
  /// columns are the caller's (dora_forward puts A^T there for its product). `route`: the adapter
  /// of each column (a mixed batch), or nullptr when every column goes through the active one.
  Eigen::Map<Matrix> tape_begin(const Eigen::Ref<const Matrix>& X, Index extra,
                                const std::vector<int>* route) const;

  void tape_record(int index, const Adapter& a, const Eigen::Ref<const Matrix>& sc) const;

  Eigen::Map<Matrix> tape_direction() const {
    return Eigen::Map<Matrix>(tape_zn_.data(), out_features(), tape_n_);
  }

  /// True when the tape holds what a backward of adapter `index` over X needs: the same X, the
  /// same adapter values, and the same columns routed to `index` (`route`: the backward's routing,
  /// nullptr when every column is the adapter's). Columns routed elsewhere in the forward were
  /// never written for this adapter.
  bool tape_fits(int index, const Adapter& a, const Eigen::Ref<const Matrix>& X,
                 const std::vector<int>* route) const;

  Frozen frozen_;
  Vector bias_;
  std::vector<std::unique_ptr<Entry>> entries_;  // stable addresses: add_adapter returns a ref
  int active_ = -1;
  MergedFactors merged_;
  bool training_ = true;
  bool requires_grad_ = true;        // false: backward keeps the adapters' gradients (dX only)
  std::vector<Vector> saved_grads_;  // the gradients a backward with requires_grad_ false puts back
  const char* face_;
  // LoRA dropout state, written by a training-mode forward (see train()).
  mutable Rng dropout_rng_{kDropoutSeedOffset};
  mutable Vector mask_storage_;
  mutable Index mask_rows_ = 0, mask_cols_ = 0;
  // DoRA: ||row i of W0||^2 as stored, measured when the first DoRA adapter joins (W0 is frozen).
  Eigen::VectorXd w0_sq_norms_;
  // DoRA's tape, written by a training-mode forward (see tape_begin).
  struct TapeEntry {
    bool valid = false;
    T scaling{};
    Matrix A, B;
    Vector m, inv;  // inv: 1 / ||W|| per row
  };
  mutable std::vector<TapeEntry> tape_;  // per adapter index
  mutable std::vector<int> tape_route_;  // the adapter of each column on the tape
  mutable Vector tape_x_, tape_zn_;      // X (k x n) and Z / ||W|| (d x n), grown, never shrunk
  mutable Index tape_n_ = -1;            // the batch on the tape; -1: none
};

// ---- AdapterLayer's members with non-trivial bodies, declared (and documented) in the class.
// Defined out of the class and not inline, so that a file seeing the extern template of a shipped
// instantiation (lora/extern_templates.hpp) does not instantiate them again.

template <typename T, typename Frozen>
AdapterLayer<T, Frozen>::AdapterLayer(Frozen frozen, Vector bias, const char* face)
    : frozen_(std::move(frozen)), bias_(std::move(bias)), face_(face) {
  detail::require(bias_.size() == 0 || bias_.size() == out_features(), face_,
                  ": bias must have length ", out_features(), " (out_features), got ",
                  bias_.size());
}

template <typename T, typename Frozen>
AdapterLayer<T, Frozen>::AdapterLayer(const AdapterLayer& o)
    : frozen_(o.frozen_),
      bias_(o.bias_),
      active_(o.active_),
      merged_(o.merged_),
      training_(o.training_),
      requires_grad_(o.requires_grad_),
      face_(o.face_),
      dropout_rng_(o.dropout_rng_),
      mask_storage_(o.mask_storage_),
      mask_rows_(o.mask_rows_),
      mask_cols_(o.mask_cols_),
      w0_sq_norms_(o.w0_sq_norms_) {  // DoRA's tape is not copied: a copy's backward recomputes
  entries_.reserve(o.entries_.size());
  for (const auto& e : o.entries_) entries_.push_back(std::make_unique<Entry>(*e));
}

template <typename T, typename Frozen>
auto AdapterLayer<T, Frozen>::operator=(const AdapterLayer& o) -> AdapterLayer& {
  if (this != &o) *this = AdapterLayer(o);
  return *this;
}

template <typename T, typename Frozen>
auto AdapterLayer<T, Frozen>::add_adapter(const std::string& name, const LoRAConfig& cfg)
    -> Adapter& {
  return add_adapter(name, Adapter(out_features(), in_features(), cfg));
}

template <typename T, typename Frozen>
auto AdapterLayer<T, Frozen>::add_adapter(const std::string& name, const LoRAConfig& cfg,
                                          const Eigen::Ref<const Matrix>& original) -> Adapter& {
  return add_adapter_from(name, Adapter(out_features(), in_features(), cfg), &original);
}

template <typename T, typename Frozen>
auto AdapterLayer<T, Frozen>::add_adapter(const std::string& name, const LoRAConfig& cfg,
                                          Matrix&& original) -> Adapter& {
  return add_adapter_from(name, Adapter(out_features(), in_features(), cfg), nullptr, &original);
}

template <typename T, typename Frozen>
auto AdapterLayer<T, Frozen>::add_adapter(const std::string& name, Adapter adapter) -> Adapter& {
  return add_adapter_from(name, std::move(adapter), nullptr);
}

template <typename T, typename Frozen>
auto AdapterLayer<T, Frozen>::add_adapter_from(const std::string& name, Adapter adapter,
                                               const Eigen::Ref<const Matrix>* original,
                                               Matrix* owned) -> Adapter& {
  const detail::Where where{face_, "add_adapter"};
  detail::require(!name.empty(), where, ": the name is empty");
  detail::require(find(name) < 0, where, ": an adapter named \"", name, "\" already exists");
  require_fits(where, name, adapter);
  prepare_base_init(where, adapter, original, owned);
  prepare_dora(where, adapter);
  // The first adapter seeds LoRA dropout, apart from A's draw (which uses config.seed itself).
  if (entries_.empty()) dropout_rng_ = Rng(adapter.config().seed + kDropoutSeedOffset);
  entries_.push_back(std::make_unique<Entry>(Entry{name, std::move(adapter)}));
  return entries_.back()->adapter;
}

template <typename T, typename Frozen>
void AdapterLayer<T, Frozen>::remove_adapter(const std::string& name) {
  const int i = index_or_throw("remove_adapter", name);
  if (i == active_) disable();
  entries_.erase(entries_.begin() + i);
  if (active_ > i) --active_;
  forget_tape();
}

template <typename T, typename Frozen>
void AdapterLayer<T, Frozen>::replace_adapter(const std::string& name, const Adapter& adapter) {
  const detail::Where where{face_, "replace_adapter"};
  const int i = index_or_throw("replace_adapter", name);
  detail::require_state(!(i == active_ && is_merged()), where, ": adapter \"", name,
                        "\" is merged; call unmerge() first");
  require_fits(where, name, adapter);
  Adapter copy = adapter;
  prepare_base_init(where, copy, nullptr);
  prepare_dora(where, copy);
  entry(i).adapter = std::move(copy);
  forget_tape();
}

template <typename T, typename Frozen>
std::vector<std::string> AdapterLayer<T, Frozen>::adapter_names() const {
  std::vector<std::string> out;
  for (const auto& e : entries_) out.push_back(e->name);
  return out;
}

template <typename T, typename Frozen>
auto AdapterLayer<T, Frozen>::trainable_parameter_count() const -> Index {
  Index n = 0;
  for (const auto& e : entries_) n += e->adapter.parameter_count();
  return n;
}

template <typename T, typename Frozen>
void AdapterLayer<T, Frozen>::set_active(const std::string& name) {
  const int i = index_or_throw("set_active", name);
  if (i == active_) return;
  forget_tape();
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

template <typename T, typename Frozen>
void AdapterLayer<T, Frozen>::disable() {
  unmerge();
  active_ = -1;
}

template <typename T, typename Frozen>
auto AdapterLayer<T, Frozen>::forward(const Eigen::Ref<const Matrix>& X) const -> Matrix {
  Matrix H(out_features(), X.cols());
  WorkspaceType ws;
  forward(X, H, ws);
  return H;
}

template <typename T, typename Frozen>
void AdapterLayer<T, Frozen>::forward(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H,
                                      WorkspaceType& ws) const {
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
  if (a.uses_dora()) {
    dora_forward(a, X, H, ws);
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

template <typename T, typename Frozen>
auto AdapterLayer<T, Frozen>::forward_mixed(const Eigen::Ref<const Matrix>& X,
                                            const std::vector<int>& adapters) const -> Matrix {
  Matrix H(out_features(), X.cols());
  WorkspaceType ws;
  forward_mixed(X, adapters, H, ws);
  return H;
}

template <typename T, typename Frozen>
void AdapterLayer<T, Frozen>::forward_mixed(const Eigen::Ref<const Matrix>& X,
                                            const std::vector<int>& adapters, Eigen::Ref<Matrix> H,
                                            WorkspaceType& ws) const {
  const detail::Where where{face_, "forward_mixed"};
  require_mixed_args(where, X, adapters);
  detail::require_forward_args(where, X, H, out_features(), in_features());
  const bool dropout = mixed_dropout_active(adapters);
  const int count = static_cast<int>(entries_.size());
  const bool dora = mixed_uses_dora(adapters);
  if (!dropout && !dora) {  // the serving path: one pass per adapter segment, then W0 X
    detail::assign_segmented_low_rank<T>(
        X, adapters.data(), count, [&](int a) -> const Adapter& { return entry(a).adapter; }, bias_,
        H, ws);
    frozen_.multiply_add(X, H);  // (d x k)(k x n)
    return;
  }
  if (dropout) draw_dropout_mask(X.cols(), [&](Index j) { return column_dropout(adapters, j); });
  // DoRA's m and 1/||W|| of adapter a in columns 2a, 2a + 1 (they scale its columns after the
  // frozen product).
  auto scales = ws.get(Slot::DoraScales, out_features(), dora ? 2 * count : 0);
  if (dora && training_) tape_begin(X, 0, &adapters);
  // Each column starts as its adapter's term plus the bias (as forward does), then the one
  // frozen product accumulates over the whole batch.
  for (int a = 0; a < count; ++a) {
    const Index n_a = column_count(adapters, a);
    if (n_a == 0) continue;
    const Adapter& ad = entry(a).adapter;
    const bool masked = dropout && ad.config().dropout > 0;
    auto Xa = gather_input(X, adapters, a, n_a, dropout, ws);  // k x n_a
    auto Ya = ws.get(Slot::GatheredOutput, out_features(), n_a);
    if (!ad.uses_dora()) {
      ad.assign_forward(Xa, Ya, ws.get(Slot::LowRank, ad.rank(), n_a), bias_);  // d x n_a
    } else {
      auto sc = scales.middleCols(2 * a, 2);
      dora_scales(ad, ws, sc);
      if (training_) tape_record(a, ad, sc);
      ad.assign_forward(Xa, Ya, ws.get(Slot::LowRank, ad.rank(), n_a), Vector());  // s B A Xa
      // Without dropout the columns are scaled after the frozen product below; with it, the
      // scaled base term sees the dropped input (W0 X + (c - 1) .* W0 Xd + ...): see
      // dora_forward.
      if (masked) {
        auto base = ws.get(Slot::DoraBase, out_features(), n_a);
        frozen_.multiply(Xa, base);  // W0 Xd: (d x k)(k x n_a)
        Ya += base;
        for (Index j = 0, c = 0; j < X.cols(); ++j)
          if (adapters[static_cast<std::size_t>(j)] == a) {
            dora_finish_column(Ya.col(c), sc, training_ ? j : -1, base.col(c));
            ++c;
          }
      }
    }
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
  if (!dora) return;
  for (Index j = 0; j < X.cols(); ++j) {  // DoRA columns without dropout: H = c .* Z + b
    const int a = adapters[static_cast<std::size_t>(j)];
    if (a == kNoAdapter || !entry(a).adapter.uses_dora()) continue;
    if (dropout && entry(a).adapter.config().dropout > 0) continue;  // done above
    dora_finish_column(H.col(j), scales.middleCols(2 * a, 2), training_ ? j : -1);
  }
}

template <typename T, typename Frozen>
auto AdapterLayer<T, Frozen>::backward(const Eigen::Ref<const Matrix>& X,
                                       const Eigen::Ref<const Matrix>& G) -> Matrix {
  Matrix dX(in_features(), X.cols());
  WorkspaceType ws;
  backward(X, G, dX, ws);
  return dX;
}

template <typename T, typename Frozen>
void AdapterLayer<T, Frozen>::backward(const Eigen::Ref<const Matrix>& X,
                                       const Eigen::Ref<const Matrix>& G, Eigen::Ref<Matrix> dX,
                                       WorkspaceType& ws) {
  const detail::Where where{face_, "backward"};
  Adapter& a = trainable_active(where);
  detail::require_backward_args(where, X, G, out_features(), in_features());
  detail::require_input_gradient_arg(where, dX, X, G);
  const GradientKeeper keep(*this);  // set_requires_grad(false): the gradients are put back
  if (a.uses_dora()) {
    const bool dropout = dropout_active();
    if (dropout) {
      dora_gradients(a, active_, masked_input(where, X, ws), X, G, nullptr, &dX, true, ws);
      dX.array() *= dropout_mask().array();    // the adapter and the scaled base saw M .* X
      frozen_.multiply_transposed_add(G, dX);  // dX += W0^T G: (k x d)(d x n)
    } else {
      const auto Gc = dora_gradients(a, active_, X, X, G, nullptr, &dX, false, ws);
      frozen_.multiply_transposed_add(Gc, dX);  // dX += W0^T (c .* G): (k x d)(d x n)
    }
    return;
  }
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

template <typename T, typename Frozen>
void AdapterLayer<T, Frozen>::backward_without_input_grad(const Eigen::Ref<const Matrix>& X,
                                                          const Eigen::Ref<const Matrix>& G,
                                                          WorkspaceType& ws) {
  const detail::Where where{face_, "backward_without_input_grad"};
  Adapter& a = trainable_active(where);
  detail::require_backward_args(where, X, G, out_features(), in_features());
  if (!requires_grad_) return;  // no gradients wanted, and no dX: nothing to do
  if (a.uses_dora()) {
    if (dropout_active()) {
      dora_gradients(a, active_, masked_input(where, X, ws), X, G, nullptr, nullptr, true, ws);
    } else {
      dora_gradients(a, active_, X, X, G, nullptr, nullptr, false, ws);
    }
    return;
  }
  auto AX = ws.get(Slot::LowRank, a.rank(), X.cols());
  auto BtG = ws.get(Slot::BackProjected, a.rank(), X.cols());
  if (dropout_active()) {
    a.accumulate_gradients(masked_input(where, X, ws), G, AX, BtG);
  } else {
    a.accumulate_gradients(X, G, AX, BtG);
  }
}

template <typename T, typename Frozen>
void AdapterLayer<T, Frozen>::backward_without_input_grad(const Eigen::Ref<const Matrix>& X,
                                                          const Eigen::Ref<const Matrix>& G) {
  WorkspaceType ws;
  backward_without_input_grad(X, G, ws);
}

template <typename T, typename Frozen>
auto AdapterLayer<T, Frozen>::backward_mixed(const Eigen::Ref<const Matrix>& X,
                                             const std::vector<int>& adapters,
                                             const Eigen::Ref<const Matrix>& G) -> Matrix {
  Matrix dX(in_features(), X.cols());
  WorkspaceType ws;
  backward_mixed(X, adapters, G, dX, ws);
  return dX;
}

template <typename T, typename Frozen>
void AdapterLayer<T, Frozen>::backward_mixed(const Eigen::Ref<const Matrix>& X,
                                             const std::vector<int>& adapters,
                                             const Eigen::Ref<const Matrix>& G,
                                             Eigen::Ref<Matrix> dX, WorkspaceType& ws) {
  const detail::Where where{face_, "backward_mixed"};
  detail::require_input_gradient_arg(where, dX, X, G);
  const GradientKeeper keep(*this);  // set_requires_grad(false): the gradients are put back
  const bool scaled = mixed_gradients(where, X, adapters, G, &dX, ws);
  // dX += W0^T G, with DoRA columns (without dropout) as c .* G: (k x d)(d x n)
  if (scaled) {
    frozen_.multiply_transposed_add(ws.get(Slot::DoraOutputGrad, out_features(), X.cols()), dX);
  } else {
    frozen_.multiply_transposed_add(G, dX);
  }
}

template <typename T, typename Frozen>
void AdapterLayer<T, Frozen>::backward_mixed_without_input_grad(const Eigen::Ref<const Matrix>& X,
                                                                const std::vector<int>& adapters,
                                                                const Eigen::Ref<const Matrix>& G,
                                                                WorkspaceType& ws) {
  const GradientKeeper keep(*this);  // set_requires_grad(false): nothing changes
  mixed_gradients(detail::Where{face_, "backward_mixed_without_input_grad"}, X, adapters, G,
                  nullptr, ws);
}

template <typename T, typename Frozen>
void AdapterLayer<T, Frozen>::zero_grad() {
  for (auto& e : entries_) e->adapter.zero_grad();
}

template <typename T, typename Frozen>
void AdapterLayer<T, Frozen>::merge() {
  if (is_merged()) return;
  const Entry& e = active_entry("merge");
  require_mergeable(detail::Where{face_, "merge"}, e);
  // Keep the factors merged (no allocation after the first merge of this shape): unmerge
  // subtracts exactly these, whatever happens to the adapter meanwhile.
  merged_.scaling = e.adapter.scaling();
  merged_.A = e.adapter.A();
  merged_.B = e.adapter.B();
  merged_.m = e.adapter.magnitude();  // empty for LoRA
  if (e.adapter.uses_dora()) {
    WorkspaceType ws;  // merge is not a hot path
    auto sc = ws.get(Slot::DoraScales, out_features(), 2);
    dora_scales(e.adapter, ws, sc);
    // The row scale unmerge divides out again: c = m / ||W|| in double, then rounded to T (a c
    // that overflows T, or whose inverse does, is refused by the storage's merge).
    merged_.g = (sc.col(0).template cast<double>().cwiseProduct(sc.col(1).template cast<double>()))
                    .template cast<T>();
  } else {
    merged_.g.resize(0);
  }
  forget_tape();
  frozen_.merge(merged_.scaling, merged_.B, merged_.A, merged_.g);
}

template <typename T, typename Frozen>
void AdapterLayer<T, Frozen>::unmerge() {
  if (!is_merged()) return;
  frozen_.unmerge(merged_.scaling, merged_.B, merged_.A, merged_.g);
}

template <typename T, typename Frozen>
bool AdapterLayer<T, Frozen>::all_finite() const {
  for (const auto& e : entries_)
    if (!e->adapter.all_finite()) return false;
  return bias_.allFinite() && frozen_.all_finite();
}

template <typename T, typename Frozen>
void AdapterLayer<T, Frozen>::check_finite() const {
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

template <typename T, typename Frozen>
AdapterLayer<T, Frozen>::GradientKeeper::GradientKeeper(AdapterLayer& layer)
    : layer_(layer.requires_grad_ ? nullptr : &layer) {
  if (layer_ == nullptr) return;
  auto& saved = layer_->saved_grads_;
  if (saved.size() < 4 * layer_->entries_.size()) saved.resize(4 * layer_->entries_.size());
  std::size_t i = 0;
  for (auto& e : layer_->entries_) {
    Adapter& a = e->adapter;
    for (auto* g : {&a.grad_A(), &a.grad_B()}) copy(*g, saved[i++]);
    for (auto* g : {&a.grad_lora_bias(), &a.grad_magnitude()}) copy(*g, saved[i++]);
  }
}

template <typename T, typename Frozen>
AdapterLayer<T, Frozen>::GradientKeeper::~GradientKeeper() {
  if (layer_ == nullptr) return;
  std::size_t i = 0;
  for (auto& e : layer_->entries_) {
    Adapter& a = e->adapter;
    for (auto* g : {&a.grad_A(), &a.grad_B()}) put(layer_->saved_grads_[i++], *g);
    for (auto* g : {&a.grad_lora_bias(), &a.grad_magnitude()}) put(layer_->saved_grads_[i++], *g);
  }
}

template <typename T, typename Frozen>
int AdapterLayer<T, Frozen>::find(const std::string& name) const {
  for (std::size_t i = 0; i < entries_.size(); ++i)
    if (entries_[i]->name == name) return static_cast<int>(i);
  return -1;
}

template <typename T, typename Frozen>
int AdapterLayer<T, Frozen>::index_or_throw(const char* method, const std::string& name) const {
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

template <typename T, typename Frozen>
auto AdapterLayer<T, Frozen>::active_entry(const char* method) const -> const Entry& {
  detail::require_state(active_ >= 0, detail::Where{face_, method},
                        ": no adapter is active; call set_active (enable() on a LoRALinear)");
  return entry(active_);
}

template <typename T, typename Frozen>
void AdapterLayer<T, Frozen>::require_fits(const detail::Where& where, const std::string& name,
                                           const Adapter& a) const {
  detail::require(
      a.out_features() == out_features() && a.in_features() == in_features(), where, ": adapter \"",
      name, "\" is for a ", detail::shape_string(a.out_features(), a.in_features()),
      " weight, this layer's W0 is ", detail::shape_string(out_features(), in_features()));
  detail::require(a.uses_dora() == (a.magnitude().size() != 0) &&
                      (!a.uses_dora() || a.magnitude().size() == out_features()),
                  where, ": adapter \"", name, "\" ",
                  a.uses_dora() ? "is a DoRA adapter whose magnitude has length "
                                : "is not a DoRA adapter but has a magnitude of length ",
                  a.magnitude().size(), "; W0 has ", out_features(), " rows");
}

template <typename T, typename Frozen>
void AdapterLayer<T, Frozen>::require_mergeable(const detail::Where& where, const Entry& e) const {
  if (!std::isfinite(static_cast<double>(e.adapter.scaling())) || !e.adapter.A().allFinite() ||
      !e.adapter.B().allFinite() || !e.adapter.magnitude().allFinite())
    throw std::domain_error(detail::concat(where, ": adapter \"", e.name,
                                           "\": A, B, the scaling and DoRA's magnitude must be "
                                           "finite; the weight was left as it was"));
}

template <typename T, typename Frozen>
void AdapterLayer<T, Frozen>::require_merge_current(const detail::Where& where) const {
  const Adapter& a = entry(active_).adapter;
  const bool current = a.scaling() == merged_.scaling && a.A() == merged_.A && a.B() == merged_.B &&
                       same(a.magnitude(), merged_.m);
  detail::require_state(current, where, ": adapter \"", entry(active_).name,
                        "\" changed after merge() (an optimizer step or a write through A(), "
                        "B() or magnitude() while merged); call unmerge(), which removes exactly "
                        "what was merged, then merge() again");
}

template <typename T, typename Frozen>
auto AdapterLayer<T, Frozen>::trainable_active(const detail::Where& where) -> Adapter& {
  detail::require_state(active_ >= 0, where,
                        ": no adapter is active; call set_active (enable() on a LoRALinear)");
  detail::require_state(!is_merged(), where,
                        ": the layer is merged; call unmerge() before training the adapter");
  return entry(active_).adapter;
}

template <typename T, typename Frozen>
void AdapterLayer<T, Frozen>::base_forward(const Eigen::Ref<const Matrix>& X,
                                           Eigen::Ref<Matrix> H) const {
  if (has_bias()) {
    H.colwise() = bias_;
    frozen_.multiply_add(X, H);
  } else {
    frozen_.multiply(X, H);
  }
}

template <typename T, typename Frozen>
auto AdapterLayer<T, Frozen>::masked_input(const detail::Where& where,
                                           const Eigen::Ref<const Matrix>& X,
                                           WorkspaceType& ws) const -> Eigen::Map<Matrix> {
  require_mask_for(where, X.cols());
  auto Xd = ws.get(Slot::MaskedInput, in_features(), X.cols());
  Xd = X.cwiseProduct(dropout_mask());
  return Xd;
}

template <typename T, typename Frozen>
void AdapterLayer<T, Frozen>::require_mask_for(const detail::Where& where, Index n) const {
  detail::require_state(mask_rows_ == in_features() && mask_cols_ == n, where,
                        ": dropout is on, but no training-mode forward with a batch of ", n,
                        " columns preceded it (the last mask is ",
                        detail::shape_string(mask_rows_, mask_cols_), ")");
}

template <typename T, typename Frozen>
void AdapterLayer<T, Frozen>::require_mixed_args(const detail::Where& where,
                                                 const Eigen::Ref<const Matrix>& X,
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

template <typename T, typename Frozen>
bool AdapterLayer<T, Frozen>::mixed_dropout_active(const std::vector<int>& adapters) const {
  if (!training_) return false;
  for (int a : adapters)
    if (a != kNoAdapter && entry(a).adapter.config().dropout > 0) return true;
  return false;
}

template <typename T, typename Frozen>
auto AdapterLayer<T, Frozen>::gather_input(const Eigen::Ref<const Matrix>& X,
                                           const std::vector<int>& adapters, int a, Index n_a,
                                           bool masked, WorkspaceType& ws) const
    -> Eigen::Map<Matrix> {
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

template <typename T, typename Frozen>
bool AdapterLayer<T, Frozen>::mixed_gradients(const detail::Where& where,
                                              const Eigen::Ref<const Matrix>& X,
                                              const std::vector<int>& adapters,
                                              const Eigen::Ref<const Matrix>& G,
                                              Eigen::Ref<Matrix>* dX, WorkspaceType& ws) {
  require_mixed_args(where, X, adapters);
  detail::require_backward_args(where, X, G, out_features(), in_features());
  const bool dropout = mixed_dropout_active(adapters);
  if (dropout) require_mask_for(where, X.cols());
  const bool scaled = dX != nullptr && mixed_uses_dora(adapters);
  auto G_out = ws.get(Slot::DoraOutputGrad, out_features(), scaled ? X.cols() : 0);
  if (scaled) G_out = G;
  for (int a = 0; a < static_cast<int>(entries_.size()); ++a) {
    const Index n_a = column_count(adapters, a);
    if (n_a == 0) continue;
    Adapter& ad = entry(a).adapter;
    auto Xa = gather_input(X, adapters, a, n_a, dropout, ws);   // k x n_a
    auto Ga = ws.get(Slot::GatheredGrad, out_features(), n_a);  // d x n_a
    for (Index j = 0, c = 0; j < X.cols(); ++j)
      if (adapters[static_cast<std::size_t>(j)] == a) Ga.col(c++) = G.col(j);
    if (ad.uses_dora()) {
      const bool masked = dropout && ad.config().dropout > 0;
      auto dXa = ws.get(Slot::GatheredOutput, in_features(), dX != nullptr ? n_a : 0);
      Eigen::Ref<Matrix> dXa_ref(dXa);
      const auto Gc = dora_gradients(ad, a, Xa, X, Ga, &adapters,
                                     dX != nullptr ? &dXa_ref : nullptr, masked, ws);
      if (dX == nullptr) continue;
      if (!masked) scatter(Gc, adapters, a, G_out);  // W0^T (c .* G) for these columns
      scatter(dXa, adapters, a, *dX);
      continue;
    }
    auto BtG = ws.get(Slot::BackProjected, ad.rank(), n_a);
    ad.accumulate_gradients(Xa, Ga, ws.get(Slot::LowRank, ad.rank(), n_a), BtG);
    if (dX == nullptr) continue;
    auto dXa = ws.get(Slot::GatheredOutput, in_features(), n_a);
    ad.assign_input_gradient(BtG, dXa);  // s A^T (B^T G_a): (k x r)(r x n_a)
    scatter(dXa, adapters, a, *dX);
  }
  if (dX == nullptr) return false;
  const auto M = dropout_mask();
  for (Index j = 0; j < X.cols(); ++j) {
    if (adapters[static_cast<std::size_t>(j)] == kNoAdapter) {
      dX->col(j).setZero();
    } else if (dropout) {
      dX->col(j).array() *= M.col(j).array();  // the adapter saw M .* X
    }
  }
  return scaled;
}

template <typename T, typename Frozen>
bool AdapterLayer<T, Frozen>::mixed_uses_dora(const std::vector<int>& adapters) const {
  for (int a : adapters)
    if (a != kNoAdapter && entry(a).adapter.uses_dora()) return true;
  return false;
}

template <typename T, typename Frozen>
void AdapterLayer<T, Frozen>::prepare_base_init(const detail::Where& where, Adapter& a,
                                                const Eigen::Ref<const Matrix>* original,
                                                Matrix* owned) {
  if (!a.init_pending()) return;
  detail::run_base_init<T>(where, frozen_, a, original, owned);
  forget_tape();
  if (w0_sq_norms_.size() != 0) {
    Eigen::VectorXd norms(out_features());
    frozen_.row_norms(norms);
    w0_sq_norms_ = norms.array().square();
  }
}

template <typename T, typename Frozen>
void AdapterLayer<T, Frozen>::prepare_dora(const detail::Where& where, Adapter& a) {
  if (!a.uses_dora()) return;
  if (w0_sq_norms_.size() == 0) {
    detail::require_state(!is_merged(), where,
                          ": a DoRA adapter needs the row norms of W0, which a merged layer no "
                          "longer holds; call unmerge() first");
    Eigen::VectorXd norms(out_features());
    frozen_.row_norms(norms);
    w0_sq_norms_ = norms.array().square();
  }
  if (a.magnitude_pending()) {
    Vector m(out_features());
    for (Index i = 0; i < m.size(); ++i) m(i) = static_cast<T>(std::sqrt(w0_sq_norms_(i)));
    a.set_magnitude(m);
  }
}

template <typename T, typename Frozen>
void AdapterLayer<T, Frozen>::dora_scales(const Adapter& a, WorkspaceType& ws,
                                          Eigen::Ref<Matrix> sc) const {
  auto At = ws.get(Slot::DoraFactorT, in_features(), a.rank());
  At = a.A().transpose();
  auto P = ws.get(Slot::DoraProjected, out_features(), a.rank());
  frozen_.multiply(At, P);  // W0 A^T: (d x k)(k x r)
  dora_scales_from(a, P, ws, sc);
}

template <typename T, typename Frozen>
void AdapterLayer<T, Frozen>::dora_scales_from(const Adapter& a, const Eigen::Ref<const Matrix>& P,
                                               WorkspaceType& ws, Eigen::Ref<Matrix> sc) const {
  const Index d = out_features(), r = a.rank();
  const double s = static_cast<double>(a.scaling());
  auto gram = ws.get(Slot::DoraGram, r, r);
  gram.setZero();
  detail::gemm_add(gram, a.A(), a.A().transpose(), T(1));  // A A^T: (r x k)(k x r)
  auto BG = ws.get(Slot::DoraGramB, d, r);
  BG.setZero();
  detail::gemm_add(BG, a.B(), gram, T(1));  // B (A A^T): (d x r)(r x r)
  const Matrix& B = a.B();
  const Vector& m = a.magnitude();
  Index fallback = 0;
  for (Index i = 0; i < d; ++i) {
    double cross = 0, quad = 0;
    for (Index j = 0; j < r; ++j) {
      cross += double(B(i, j)) * double(P(i, j));  // b_i . (A w_i)
      quad += double(B(i, j)) * double(BG(i, j));  // b_i (A A^T) b_i^T
    }
    const double w2 = w0_sq_norms_(i);
    const double sq = w2 + 2 * s * cross + s * s * quad;
    const double terms = w2 + 2 * std::abs(s * cross) + s * s * std::abs(quad);
    // Accepted only with finite terms: an overflowed Gram term (inf >= inf) says nothing about
    // the norm. False for NaN too.
    if (std::isfinite(terms) && sq * kDoraMaxCancellation >= terms) {
      set_dora_scale(sc, i, m(i), std::sqrt(sq));
    } else {
      sc(i, 1) = T(-1);  // marks the row for the exact recomputation
      ++fallback;
    }
  }
  if (fallback > 0) dora_exact_norms(a, fallback, ws, sc);
}

template <typename T, typename Frozen>
void AdapterLayer<T, Frozen>::dora_exact_norms(const Adapter& a, Index q, WorkspaceType& ws,
                                               Eigen::Ref<Matrix> sc) const {
  const Index d = out_features(), k = in_features(), r = a.rank();
  auto E = ws.get(Slot::DoraRowSelect, d, q);
  E.setZero();
  for (Index i = 0, c = 0; i < d; ++i)
    if (sc(i, 1) < 0) E(i, c++) = T(1);
  auto rows = ws.get(Slot::DoraRows, k, q);
  rows.setZero();
  frozen_.multiply_transposed_add(E, rows);  // W0^T E: the marked rows of W0, (k x d)(d x q)
  const double s = static_cast<double>(a.scaling());
  const Matrix& A = a.A();
  const Matrix& B = a.B();
  for (Index i = 0, c = 0; i < d; ++i) {
    if (sc(i, 1) >= 0) continue;
    // ||v|| as scale * sqrt(ssq) (LAPACK's dnrm2 update): v * v may overflow double where the
    // norm does not (a double layer with elements near 1e200).
    double scale = 0, ssq = 1;
    for (Index l = 0; l < k; ++l) {
      double v = double(rows(l, c));
      for (Index j = 0; j < r; ++j) v += s * double(B(i, j)) * double(A(j, l));
      if (!std::isfinite(v))
        throw std::domain_error(detail::concat(
            face_, ": DoRA: row ", i, " of W0 + s*B*A is not finite in double at column ", l, " (",
            v, "); its norm, which DoRA divides by, cannot be computed"));
      const double av = std::abs(v);
      if (av == 0) continue;
      if (scale < av) {
        ssq = 1 + ssq * (scale / av) * (scale / av);
        scale = av;
      } else {
        ssq += (av / scale) * (av / scale);
      }
    }
    const double norm = scale * std::sqrt(ssq);
    if (!std::isfinite(norm))
      throw std::domain_error(
          detail::concat(face_, ": DoRA: the norm of row ", i, " of W0 + s*B*A overflows double"));
    set_dora_scale(sc, i, a.magnitude()(i), norm);
    ++c;
  }
}

template <typename T, typename Frozen>
void AdapterLayer<T, Frozen>::dora_forward(const Adapter& a, const Eigen::Ref<const Matrix>& X,
                                           Eigen::Ref<Matrix> H, WorkspaceType& ws) const {
  const Index d = out_features(), k = in_features(), n = X.cols(), r = a.rank();
  auto sc = ws.get(Slot::DoraScales, d, 2);
  const bool dropout = dropout_active();
  // The product's input [X or Xd, A^T] (k x (n + r)): in training mode the tape's copy of X.
  Eigen::Map<Matrix> Xe = training_ ? tape_begin(X, r, nullptr) : ws.get(Slot::DoraInput, k, n + r);
  if (!training_) Xe.leftCols(n) = X;
  Xe.rightCols(r) = a.A().transpose();
  auto He = ws.get(Slot::DoraOutput, d, n + r);  // [Z, W0 A^T]
  if (dropout) {
    draw_dropout_mask(n, [p = a.config().dropout](Index) { return p; });
    auto Xd = ws.get(Slot::MaskedInput, k, n + r);
    Xd.leftCols(n) = X.cwiseProduct(dropout_mask());
    Xd.rightCols(r) = Xe.rightCols(r);
    frozen_.multiply(Xd, He);  // [W0 Xd, W0 A^T]: (d x k)(k x (n + r))
    dora_scales_from(a, He.rightCols(r), ws, sc);
    if (training_) tape_record(active_, a, sc);
    // H = s B A Xd + W0 Xd = Zd, then c .* Zd + b - W0 Xd, then + W0 X.
    a.assign_forward(Xd.leftCols(n), H, ws.get(Slot::LowRank, r, n), Vector());
    H += He.leftCols(n);
    for (Index j = 0; j < n; ++j) dora_finish_column(H.col(j), sc, j, He.col(j));
    frozen_.multiply_add(X, H);  // + W0 X: (d x k)(k x n)
  } else {
    a.assign_forward(X, He.leftCols(n), ws.get(Slot::LowRank, r, n), Vector());  // s B A X
    He.rightCols(r).setZero();
    frozen_.multiply_add(Xe, He);  // [Z, W0 A^T]: (d x k)(k x (n + r)), the cost of the layer
    dora_scales_from(a, He.rightCols(r), ws, sc);
    if (training_) tape_record(active_, a, sc);
    for (Index j = 0; j < n; ++j) {
      H.col(j) = He.col(j);
      dora_finish_column(H.col(j), sc, training_ ? j : -1);
    }
  }
}

template <typename T, typename Frozen>
auto AdapterLayer<T, Frozen>::dora_gradients(
    Adapter& ad, int index, const Eigen::Ref<const Matrix>& Xin, const Eigen::Ref<const Matrix>& X,
    const Eigen::Ref<const Matrix>& G, const std::vector<int>* adapters, Eigen::Ref<Matrix>* dXa,
    bool dropout, WorkspaceType& ws) -> Eigen::Map<Matrix> {
  const Index d = out_features(), n = Xin.cols(), r = ad.rank();
  auto sc = ws.get(Slot::DoraScales, d, 2);
  auto Gc = ws.get(Slot::DoraScaledGrad, d, n);
  auto& dm = ad.grad_magnitude();
  // One pass over the group's columns: dm += G .* Zn (summed over columns), Gc = c .* G.
  auto scale_and_dm = [&](Index c, auto zn) {
    dm.noalias() += G.col(c).cwiseProduct(zn);
    dora_scale_col(Gc.col(c), sc, G.col(c));
  };
  if (tape_fits(index, ad, X, adapters)) {
    sc.col(0) = ad.magnitude();
    sc.col(1) = tape_[static_cast<std::size_t>(index)].inv;
    const auto tape = tape_direction();
    if (adapters == nullptr) {
      for (Index j = 0; j < n; ++j) scale_and_dm(j, tape.col(j));
    } else {
      for (Index j = 0, c = 0; j < X.cols(); ++j)
        if ((*adapters)[static_cast<std::size_t>(j)] == index) scale_and_dm(c++, tape.col(j));
    }
  } else {
    // No matching training-mode forward: one more dense product recomputes Z.
    dora_scales(ad, ws, sc);
    auto Zn = ws.get(Slot::DoraDirection, d, n);
    ad.assign_forward(Xin, Zn, ws.get(Slot::LowRank, r, n), Vector());  // s B A Xin
    frozen_.multiply_add(Xin, Zn);                                      // + W0 Xin
    for (Index j = 0; j < n; ++j) scale_and_dm(j, Zn.col(j).cwiseProduct(sc.col(1)));
  }
  auto BtG = ws.get(Slot::BackProjected, r, n);
  ad.accumulate_gradients(Xin, Gc, ws.get(Slot::LowRank, r, n), BtG);
  if (dXa == nullptr) return Gc;
  ad.assign_input_gradient(BtG, *dXa);  // s A^T (B^T Gc): (k x r)(r x n)
  if (dropout) {
    for (Index j = 0; j < n; ++j)  // (c - 1) .* G, c in double
      Gc.col(j) =
          ((sc.col(0).template cast<double>().array() * sc.col(1).template cast<double>().array() -
            1.0) *
           G.col(j).template cast<double>().array())
              .template cast<T>()
              .matrix();
    frozen_.multiply_transposed_add(Gc, *dXa);  // + W0^T ((c - 1) .* G): (k x d)(d x n)
  }
  return Gc;
}

template <typename T, typename Frozen>
auto AdapterLayer<T, Frozen>::tape_begin(const Eigen::Ref<const Matrix>& X, Index extra,
                                         const std::vector<int>* route) const
    -> Eigen::Map<Matrix> {
  const Index k = in_features(), n = X.cols();
  if (tape_x_.size() < k * (n + extra)) tape_x_.resize(k * (n + extra));
  if (tape_zn_.size() < out_features() * n) tape_zn_.resize(out_features() * n);
  Eigen::Map<Matrix> Xe(tape_x_.data(), k, n + extra);
  Xe.leftCols(n) = X;
  if (tape_.size() < entries_.size()) tape_.resize(entries_.size());
  for (auto& t : tape_) t.valid = false;
  if (route != nullptr) {
    tape_route_.assign(route->begin(), route->end());  // no allocation once grown
  } else {
    tape_route_.assign(static_cast<std::size_t>(n), active_);
  }
  tape_n_ = n;
  return Xe;
}

template <typename T, typename Frozen>
void AdapterLayer<T, Frozen>::tape_record(int index, const Adapter& a,
                                          const Eigen::Ref<const Matrix>& sc) const {
  TapeEntry& t = tape_[static_cast<std::size_t>(index)];
  t.valid = true;
  t.scaling = a.scaling();
  t.A = a.A();  // same shapes from step to step: no allocation
  t.B = a.B();
  t.m = a.magnitude();
  t.inv = sc.col(1);
}

template <typename T, typename Frozen>
bool AdapterLayer<T, Frozen>::tape_fits(int index, const Adapter& a,
                                        const Eigen::Ref<const Matrix>& X,
                                        const std::vector<int>* route) const {
  if (tape_n_ != X.cols() || static_cast<std::size_t>(index) >= tape_.size()) return false;
  for (std::size_t j = 0; j < tape_route_.size(); ++j) {
    const bool now = route == nullptr || (*route)[j] == index;
    if ((tape_route_[j] == index) != now) return false;
  }
  const TapeEntry& t = tape_[static_cast<std::size_t>(index)];
  return t.valid && t.scaling == a.scaling() && same(t.A, a.A()) && same(t.B, a.B()) &&
         same(t.m, a.magnitude()) &&
         Eigen::Map<const Matrix>(tape_x_.data(), in_features(), tape_n_) == X;
}

}  // namespace lora
