// LoRAEmbedding<T, Frozen>: a frozen token-embedding table with named LoRA adapters, PEFT's
// lora.Embedding. For token ids t_1 .. t_n the output has a column per token:
//   H(:, j) = W0[t_j] + s B A(:, t_j)          W0: num_embeddings x dim (nn.Embedding.weight)
// with A: r x num_embeddings and B: dim x r. A lookup is the linear layer W0^T X of the one-hot
// input X (column j = e_{t_j}), so the layer is a face of AdapterLayer (adapter_layer.hpp) whose
// d x k weight is W0^T (dim x num_embeddings) and whose adapter is PEFT's (A, B) unchanged: named
// adapters, merge (W0 + s (B A)^T) with its guarantee, parameter views, optimizers, finite checks
// and every storage that can look up a column come from there. What the face adds is the input
// kind: the products with a one-hot X become gathers of columns, O(n (dim + r)) for the lookup and
// O(n r dim) for the gradients, never O(num_embeddings); the gradient of A is column-sparse and
// the optimizers step only its marked columns (see LoRAAdapter::track_sparse_grad_A, optim.hpp).
//
// As PEFT: A starts at zero and B ~ N(0, 1) (the adapted table starts equal to the base), no
// dropout is applied (PEFT's embedding keeps a dropout module but never calls it), no DoRA.
//
// A tied output head (an lm_head sharing this table) is adapted consistently by output_forward /
// output_backward, which apply the same adapted table transposed: logits = (W0 + s (B A)^T) X.
#pragma once

#include "lora/adapter.hpp"
#include "lora/adapter_layer.hpp"
#include "lora/config.hpp"
#include "lora/dense_frozen_weight.hpp"
#include "lora/detail/check.hpp"
#include "lora/frozen_storage.hpp"
#include "lora/parameter.hpp"
#include "lora/random.hpp"
#include "lora/workspace.hpp"

#include <Eigen/Core>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace lora {

/// A frozen embedding table W0 (num_embeddings x dim, the layout of torch.nn.Embedding.weight)
/// with named LoRA adapters (A: r x num_embeddings, B: dim x r, PEFT's lora_embedding_A / _B).
/// forward(ids) returns dim x n, a column per token. The layer's d x k weight (in_features(),
/// out_features(), frozen()) is W0^T: k = num_embeddings, d = dim.
///
/// `Frozen` holds W0^T and must look up columns (check_lookup_storage): DenseFrozenWeight<T> or
/// Bf16FrozenWeight. A layer built from a W0 starts with one adapter, "default", active.
template <typename T, typename Frozen = DenseFrozenWeight<T>>
class LoRAEmbedding : public AdapterLayer<T, Frozen> {
  using Core = AdapterLayer<T, Frozen>;
  static_assert(check_lookup_storage<Frozen>());

 public:
  using typename Core::Adapter;
  using typename Core::Index;
  using typename Core::Matrix;
  using typename Core::Vector;
  using typename Core::WorkspaceType;
  /// Token ids, as torch's LongTensor.
  using Ids = std::vector<std::int64_t>;

  /// Wraps the table W0 (num_embeddings x dim) and adds the adapter "default" (A = 0,
  /// B ~ N(0, 1) seeded by config.seed), active.
  explicit LoRAEmbedding(const Matrix& W0, const LoRAConfig& config = LoRAConfig{})
      : LoRAEmbedding(Frozen(transposed(W0)), config) {}

  /// Wraps a storage of W0^T (dim x num_embeddings) built by the caller, e.g.
  /// `Bf16FrozenWeight(W0.transpose(), MergeMode::ExactRestore)`, and adds "default" as above.
  LoRAEmbedding(Frozen frozen_transposed, const LoRAConfig& config)
      : Core(std::move(frozen_transposed), Vector(), "LoRAEmbedding") {
    add_adapter(kDefaultName, config);
    Core::set_active(kDefaultName);
  }

  Index num_embeddings() const { return this->in_features(); }  ///< the vocabulary size
  Index embedding_dim() const { return this->out_features(); }  ///< dim

  // ---- adapters (the core's named adapters) ----------------------------------------------------

  using Core::active_name;
  using Core::adapter;
  using Core::adapter_count;
  using Core::adapter_names;
  using Core::disable;
  using Core::has_active;
  using Core::has_adapter;
  using Core::remove_adapter;
  using Core::set_active;

  /// Adds a fresh adapter `name` with PEFT's embedding initialisation: A = 0 (r x num_embeddings),
  /// B ~ N(0, 1) (dim x r) drawn from config.seed. config.dropout is accepted and ignored, as PEFT
  /// does for embeddings; config.use_dora is refused (std::invalid_argument).
  Adapter& add_adapter(const std::string& name, const LoRAConfig& config) {
    detail::require(!config.use_dora,
                    "LoRAEmbedding::add_adapter: DoRA on an embedding is not "
                    "supported (use_dora must be false)");
    Adapter a(this->out_features(), this->in_features(), config);
    Rng rng(config.seed);
    a.A().setZero();
    fill_normal(a.B(), rng, 0.0, 1.0);
    return add_adapter(name, std::move(a));
  }

  /// Adds `adapter` (A: r x num_embeddings, B: dim x r, e.g. loaded from a file) under `name`; its
  /// gradient of A becomes column-sparse. Refuses a DoRA adapter or one with a lora bias.
  Adapter& add_adapter(const std::string& name, Adapter adapter) {
    require_plain("add_adapter", adapter);
    Adapter& a = Core::add_adapter(name, std::move(adapter));
    a.track_sparse_grad_A();
    return a;
  }

  /// Gives adapter `name` the values of `adapter` (copying into its storage where the shapes
  /// agree: optimizer views stay valid); see AdapterLayer::replace_adapter.
  void replace_adapter(const std::string& name, const Adapter& adapter) {
    require_plain("replace_adapter", adapter);
    Core::replace_adapter(name, adapter);
    Core::adapter(name).track_sparse_grad_A();
  }

  /// The active adapter (std::logic_error when none is active).
  const Adapter& active_adapter() const { return this->active_entry("active_adapter").adapter; }
  /// The active adapter, mutable.
  Adapter& active_adapter() { return const_cast<Adapter&>(std::as_const(*this).active_adapter()); }
  const Matrix& A() const { return active_adapter().A(); }  ///< A, r x num_embeddings (PEFT's)
  const Matrix& B() const { return active_adapter().B(); }  ///< B, dim x r (PEFT's)
  Matrix& A() { return active_adapter().A(); }              ///< mutable A (never resize it)
  Matrix& B() { return active_adapter().B(); }              ///< mutable B (never resize it)
  /// dL/dA (r x num_embeddings): non-zero only in the columns of ids seen since zero_grad().
  const Matrix& grad_A() const { return active_adapter().grad_A(); }
  const Matrix& grad_B() const { return active_adapter().grad_B(); }  ///< dL/dB, dim x r
  Index rank() const { return active_adapter().rank(); }              ///< r of the active adapter
  T scaling() const { return active_adapter().scaling(); }            ///< s of the active adapter

  /// The active adapter's A and B as optimizer views ("A", "B"). With sparse_A (the default) A's
  /// view carries its marked columns, so an optimizer steps only the columns of the ids seen since
  /// zero_grad (lazily: O(r n) per step, independent of num_embeddings, as torch.optim.SparseAdam);
  /// sparse_A = false gives the dense view, stepped as torch.optim.AdamW steps it (every column,
  /// O(r num_embeddings) per step).
  std::vector<ParameterView<T>> parameters(bool sparse_A = true) {
    return views(active_adapter().parameters(), sparse_A);
  }
  /// As above for adapter `name`, named "<name>.A", "<name>.B".
  std::vector<ParameterView<T>> parameters(const std::string& name, bool sparse_A) {
    return views(Core::adapter(name).parameters(name + "."), sparse_A);
  }

  // ---- lookup ----------------------------------------------------------------------------------

  /// H(:, j) = W0[ids[j]] + s B A(:, ids[j]) with the active adapter (the table alone with none;
  /// the merged table while merged). Returns dim x n.
  Matrix forward(const Ids& ids) const {
    Matrix H(embedding_dim(), static_cast<Index>(ids.size()));
    WorkspaceType ws;
    forward(ids, H, ws);
    return H;
  }

  /// As above into H (dim x n); allocation-free once ws has grown. O(n (dim + r + dim r)). Throws
  /// std::invalid_argument for an id outside [0, num_embeddings) or a wrong H; std::logic_error
  /// when the merged adapter changed after merge().
  void forward(const Ids& ids, Eigen::Ref<Matrix> H, WorkspaceType& ws) const {
    const detail::Where where{"LoRAEmbedding", "forward"};
    require_ids(where, ids);
    detail::require_shape(where, "H", H, embedding_dim(), static_cast<Index>(ids.size()));
    this->frozen().gather_columns(ids, H);  // W0[ids]^T, or the merged table's
    if (this->active_index() < 0) return;
    if (this->is_merged()) {
      this->require_merge_current(where);
      return;
    }
    const Adapter& a = this->entry(this->active_index()).adapter;
    a.add_forward_one_hot(ids, H, ws.get(Slot::LowRank, a.rank(), H.cols()));
  }

  /// Accumulates the active adapter's gradients for G = dL/dH (dim x n) of forward(ids):
  ///   dB += s G A(:, ids)^T,   dA(:, ids[j]) += s B^T G(:, j)
  /// O(n r dim); only the columns of A at the ids are touched (and marked for the optimizer). The
  /// ids have no gradient. Throws std::logic_error while merged or with no active adapter.
  void backward(const Ids& ids, const Eigen::Ref<const Matrix>& G, WorkspaceType& ws) {
    const detail::Where where{"LoRAEmbedding", "backward"};
    Adapter& a = this->trainable_active(where);
    require_ids(where, ids);
    detail::require_shape(where, "G", G, embedding_dim(), static_cast<Index>(ids.size()));
    const Index n = G.cols();
    a.accumulate_gradients_one_hot(ids, G, ws.get(Slot::LowRank, a.rank(), n),
                                   ws.get(Slot::BackProjected, a.rank(), n));
  }

  /// As above, with a workspace of its own (allocates).
  void backward(const Ids& ids, const Eigen::Ref<const Matrix>& G) {
    WorkspaceType ws;
    backward(ids, G, ws);
  }

  // ---- a tied output head (lm_head sharing this table) -----------------------------------------

  /// Logits of a head tied to this table: L = (W0 + s (B A)^T) X for hidden states X (dim x n),
  /// L: num_embeddings x n; the same adapted table the lookup uses, so the tie holds (merged or
  /// not). O(num_embeddings dim n), the head's own cost, plus r (dim + num_embeddings) n.
  Matrix output_forward(const Eigen::Ref<const Matrix>& X) const {
    Matrix L(num_embeddings(), X.cols());
    WorkspaceType ws;
    output_forward(X, L, ws);
    return L;
  }

  /// As above into L (num_embeddings x n); allocation-free once ws has grown.
  void output_forward(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> L,
                      WorkspaceType& ws) const {
    const detail::Where where{"LoRAEmbedding", "output_forward"};
    detail::require_shape(where, "X", X, embedding_dim(), X.cols());
    detail::require_shape(where, "L", L, num_embeddings(), X.cols());
    if (this->active_index() < 0 || this->is_merged()) {
      if (this->active_index() >= 0) this->require_merge_current(where);
      L.setZero();
    } else {
      // s A^T (B^T X): the adapter's input-gradient product, with X in the place of G.
      const Adapter& a = this->entry(this->active_index()).adapter;
      auto BtX = ws.get(Slot::BackProjected, a.rank(), X.cols());
      BtX.setZero();
      detail::gemm_add(BtX, a.B().transpose(), X, T(1));  // (r x dim)(dim x n)
      a.assign_input_gradient(BtX, L);                    // (k x r)(r x n)
    }
    this->frozen().multiply_transposed_add(X, L);  // + W0 X: (k x dim)(dim x n)
  }

  /// The tied head's backward for GL = dL/dlogits (num_embeddings x n): accumulates
  ///   dB += s X (A GL)^T,   dA += s (B^T X) GL^T    (dense in A: every column may change)
  /// and writes dX = (W0^T + s B A) GL (dim x n): the adapter's gradients with the roles of input
  /// and output gradient swapped. Throws std::logic_error while merged or with none active.
  void output_backward(const Eigen::Ref<const Matrix>& X, const Eigen::Ref<const Matrix>& GL,
                       Eigen::Ref<Matrix> dX, WorkspaceType& ws) {
    const detail::Where where{"LoRAEmbedding", "output_backward"};
    Adapter& a = this->trainable_active(where);
    detail::require_shape(where, "X", X, embedding_dim(), X.cols());
    detail::require_shape(where, "GL", GL, num_embeddings(), X.cols());
    detail::require_shape(where, "dX", dX, embedding_dim(), X.cols());
    const Index n = X.cols(), r = a.rank();
    auto AG = ws.get(Slot::LowRank, r, n);
    a.accumulate_gradients(GL, X, AG, ws.get(Slot::BackProjected, r, n));
    a.assign_forward(GL, dX, AG, Vector());  // s B (A GL)
    this->frozen().multiply_add(GL, dX);     // + W0^T GL: (dim x k)(k x n)
  }

  // ---- the table -------------------------------------------------------------------------------

  /// The table in use as a new num_embeddings x dim matrix: W0, or W0 + s (B A)^T while merged.
  Matrix weight() const { return this->frozen().weight().transpose(); }
  /// s (B A)^T of the active adapter as a num_embeddings x dim matrix (for inspection and
  /// export; training never forms it).
  Matrix delta_weight() const {
    const Adapter& a = active_adapter();
    return (a.scaling() * a.B() * a.A()).transpose();
  }

 private:
  static constexpr const char* kDefaultName = "default";

  static Matrix transposed(const Matrix& W0) {
    detail::require(W0.rows() >= 1 && W0.cols() >= 1,
                    "LoRAEmbedding: W0 must be at least 1 x 1 (num_embeddings x dim), got ",
                    detail::shape_string(W0.rows(), W0.cols()));
    return W0.transpose();
  }

  static void require_plain(const char* method, const Adapter& a) {
    detail::require(!a.uses_dora() && !a.has_lora_bias(), "LoRAEmbedding::", method,
                    ": an embedding adapter has no DoRA magnitude and no lora bias (PEFT has "
                    "neither for embeddings)");
  }

  void require_ids(const detail::Where& where, const Ids& ids) const {
    const std::int64_t k = num_embeddings();
    for (std::size_t j = 0; j < ids.size(); ++j)
      detail::require(ids[j] >= 0 && ids[j] < k, where, ": token id ", ids[j], " at position ", j,
                      " is outside [0, ", k, ") (num_embeddings)");
  }

  static std::vector<ParameterView<T>> views(std::vector<ParameterView<T>> v, bool sparse_A) {
    if (!sparse_A) v.front().columns = nullptr;  // A is first
    return v;
  }
};

}  // namespace lora
