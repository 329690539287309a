// LoRAAdapter<T>: the trainable half of a LoRA layer, h += s * B * (A * x), with its gradients.
// It knows nothing of the frozen weight, so one frozen base can carry several adapters.
//
// With config().use_dora the adapter is a DoRA adapter (arXiv 2402.09353): it also carries a
// magnitude m (length d) and its gradient, trained beside A and B; the layer applies it
// (adapter_layer.hpp, docs/dora.md).
//
// The tensors (A, B, the lora bias, the DoRA magnitude and their gradients) live in one heap block
// that the adapter shares with the ParameterViews handed out by parameters(): moving the adapter
// (or the layer holding it) keeps the views valid, and no view can outlive the memory it points to.
// Assigning another adapter copies into the existing buffers where the shapes agree, so an
// optimizer built earlier keeps training the new values; a tensor whose shape changes is
// reallocated and its old views become stale (see parameter.hpp).
#pragma once

#include "lora/adapter_init.hpp"
#include "lora/config.hpp"
#include "lora/detail/check.hpp"
#include "lora/detail/finite.hpp"
#include "lora/detail/gemm.hpp"
#include "lora/detail/low_rank.hpp"
#include "lora/parameter.hpp"
#include "lora/random.hpp"
#include "lora/workspace.hpp"

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

namespace lora {

namespace detail {

/// The heap block of an adapter's tensors, shared with its parameter views. Each trainable tensor
/// (with its gradient) has a lifetime whose generation moves on when its buffer is reallocated.
template <typename T>
struct AdapterTensors {
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;
  Matrix A, B, grad_A, grad_B;
  Vector lora_bias, grad_lora_bias;  // empty without a lora bias
  Vector magnitude, grad_magnitude;  // DoRA's m (length d); empty for a plain LoRA adapter
  TensorLifetime A_life, B_life, lora_bias_life, magnitude_life;
  /// The columns of grad_A that may be non-zero; dense (`all`) unless the adapter tracks them
  /// (track_sparse_grad_A: an embedding's A, whose batch touches only its token ids' columns).
  ColumnSubset grad_A_columns;

  void retire() {
    ++A_life.generation;
    ++B_life.generation;
    ++lora_bias_life.generation;
    ++magnitude_life.generation;
  }
};

/// dst = src; when the shape differs the buffer is reallocated and `life` moves on, so views of
/// the old buffer become stale instead of dangling.
template <typename M>
void assign_tensor(M& dst, const M& src, TensorLifetime& life) {
  if (dst.rows() != src.rows() || dst.cols() != src.cols()) ++life.generation;
  dst = src;
}

}  // namespace detail

/// The scaling s of cfg as a T: alpha / r, or alpha / sqrt(r) with rsLoRA. Throws
/// std::invalid_argument when it is not finite in T (alpha = 1e300 fits a double, not a float).
template <typename T>
T scaling_as(const LoRAConfig& cfg) {
  const double s = cfg.scaling();
  detail::require(
      std::isfinite(s) && std::abs(s) <= static_cast<double>(std::numeric_limits<T>::max()),
      "LoRAConfig: the scaling alpha / ", cfg.use_rslora ? "sqrt(r)" : "r", " = ", s,
      " (alpha = ", cfg.alpha, ", r = ", cfg.rank, ") must be finite in ",
      std::is_same_v<T, float> ? "float" : "double");
  return static_cast<T>(s);
}

/// The trainable half of a LoRA layer: A (r x k), B (d x r), an optional lora bias and, for DoRA,
/// the magnitude, with their gradients (see the top of this file).
template <typename T>
class LoRAAdapter {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "lora: adapters support T = float or T = double only; convert other types first.");

 public:
  using Scalar = T;                                                 ///< float or double
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;  ///< a dense T matrix
  using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;               ///< a dense T vector
  using Index = Eigen::Index;                                       ///< Eigen's index type

  /// A fresh adapter for a d x k weight: A drawn as cfg.init says (seeded), B = 0 (Orthogonal:
  /// both drawn, B A = 0; PiSSA, OLoRA, LoftQ: both zero and init_pending() until the adapter
  /// joins a layer, which takes them from its W0 and changes W0 to the residual). With
  /// cfg.use_dora, m (length d) is set to the row norms of W0 when the adapter joins a layer (until
  /// then magnitude_pending() is true and m holds ones). Throws std::invalid_argument for a bad
  /// config, a rank above min(d, k), or a scaling not finite in T.
  LoRAAdapter(Index out_features, Index in_features, const LoRAConfig& cfg);

  /// A deep copy: the copy's tensors (and views of them) are its own.
  LoRAAdapter(const LoRAAdapter& o);
  /// Moves the tensors with their views: views of `o` now see this adapter.
  LoRAAdapter(LoRAAdapter&& o) noexcept = default;

  /// Takes o's values (config, scaling, tensors), copying into this adapter's buffers where the
  /// shapes agree: views of this adapter stay valid and see the new values. A tensor of another
  /// shape is reallocated and its old views become stale.
  LoRAAdapter& operator=(const LoRAAdapter& o);
  /// As copy assignment: the values move in, this adapter's buffers (and views) stay.
  LoRAAdapter& operator=(LoRAAdapter&& o) { return *this = static_cast<const LoRAAdapter&>(o); }

  /// Views of a destroyed adapter become stale (their memory stays alive while they exist).
  ~LoRAAdapter() {
    if (t_) t_->retire();
  }

  /// r, the rank.
  Index rank() const { return tensors().A.rows(); }
  /// k, the columns of A.
  Index in_features() const { return tensors().A.cols(); }
  /// d, the rows of B.
  Index out_features() const { return tensors().B.rows(); }
  /// The adapter's hyper-parameters.
  const LoRAConfig& config() const { return config_; }

  /// s = alpha / r (or alpha / sqrt(r) with rsLoRA), as a T.
  T scaling() const { return scaling_; }

  const Matrix& A() const { return tensors().A; }  ///< r x k
  const Matrix& B() const { return tensors().B; }  ///< d x r
  /// Mutable A and B (to initialise or edit them; never resize them). A layer that has merged
  /// this adapter keeps a copy of the merged factors, so a change here cannot corrupt W0.
  Matrix& A() { return tensors().A; }
  /// Mutable B (see A()).
  Matrix& B() { return tensors().B; }
  const Matrix& grad_A() const { return tensors().grad_A; }  ///< dL/dA, r x k, accumulated
  const Matrix& grad_B() const { return tensors().grad_B; }  ///< dL/dB, d x r, accumulated
  /// Mutable dL/dA (an optimizer or a reducer writes it).
  Matrix& grad_A() { return tensors().grad_A; }
  /// Mutable dL/dB.
  Matrix& grad_B() { return tensors().grad_B; }

  /// Replaces A and B (for example with loaded values); shapes must match this adapter.
  void set_weights(const Eigen::Ref<const Matrix>& A, const Eigen::Ref<const Matrix>& B);

  // ---- inits that change the base (PiSSA, OLoRA, LoftQ; lora/init.hpp) ------------------------

  /// True for a fresh PiSSA, OLoRA or LoftQ adapter until a layer has taken its factors from W0
  /// (or set_weights gave it values).
  bool init_pending() const { return init_pending_; }
  /// True when config().init changes the base (PiSSA, OLoRA, LoftQ): the adapter only means what
  /// it was trained to mean on its residual base (see plain_adapter in lora/plain_adapter.hpp).
  bool needs_residual_base() const { return changes_base(config_.init); }
  /// The factors the adapter started from (A0: r x k, B0: d x r), kept for the conversion to a
  /// plain adapter of the original base; empty unless a layer initialised it from W0.
  const Matrix& initial_A() const { return A0_; }
  const Matrix& initial_B() const { return B0_; }  ///< B0, d x r (see initial_A)

  /// Sets A and B to the factors an init computed from W0 and keeps them as initial_A(),
  /// initial_B(); init_pending() becomes false. (The layer calls it when the adapter joins.)
  void set_initial_factors(const Eigen::Ref<const Matrix>& A, const Eigen::Ref<const Matrix>& B);

  /// Sets every gradient to zero. With a column-sparse grad_A (track_sparse_grad_A) only the
  /// columns marked since the last zero_grad are zeroed: O(r n) for n ids, not O(r k).
  void zero_grad();

  /// Trainable parameters: r * (d + k), plus d with a lora bias, plus d for DoRA's magnitude.
  Index parameter_count() const {
    const auto& t = tensors();
    return t.A.size() + t.B.size() + t.lora_bias.size() + t.magnitude.size();
  }

  /// The trainable tensors as optimizer views: A (r x k), B (d x r) and, when present, the lora
  /// bias (d x 1) and DoRA's magnitude (d x 1, named "magnitude"), each with its gradient. The
  /// views share the adapter's storage (see the top of this file); `prefix` starts their names
  /// ("fc1." gives "fc1.A").
  std::vector<ParameterView<T>> parameters(const std::string& prefix = "");

  // ---- DoRA's magnitude (config().use_dora) ----------------------------------------------------
  // The layer computes H = (m / ||W0 + s B A||_row) .* (W0 X + s B A X) + b; the adapter holds m.

  /// True for a DoRA adapter (config().use_dora).
  bool uses_dora() const { return config_.use_dora; }
  /// m, length d (empty for a plain LoRA adapter).
  const Vector& magnitude() const { return tensors().magnitude; }
  /// Mutable m (to edit it; never resize it). A merged layer keeps a copy of what it merged.
  Vector& magnitude() { return tensors().magnitude; }
  const Vector& grad_magnitude() const { return tensors().grad_magnitude; }  ///< dL/dm, length d
  /// Mutable dL/dm.
  Vector& grad_magnitude() { return tensors().grad_magnitude; }
  /// True for a fresh DoRA adapter until a layer sets m to the row norms of its W0 (PEFT's
  /// initialisation); false once m was set, by a layer or by set_magnitude.
  bool magnitude_pending() const { return magnitude_pending_; }

  /// Sets m (length d), e.g. to a loaded lora_magnitude_vector. Throws std::invalid_argument for a
  /// plain LoRA adapter or another length.
  void set_magnitude(const Eigen::Ref<const Vector>& m);

  // ---- lora bias (PEFT's `lora_bias=True`) -----------------------------------------------------
  // B becomes an affine map: the adapter adds s * (B * (A * X) + b_B), so the bias is scaled like
  // B (PEFT: lora_B(lora_A(x)) * scaling with lora_B = nn.Linear(r, d, bias=True)). A merged layer
  // folds s * B * A into the weight and still adds s * b_B (see add_lora_bias_term).

  /// True when the adapter carries a bias b_B (length d) on B.
  bool has_lora_bias() const { return tensors().lora_bias.size() != 0; }
  const Vector& lora_bias() const { return tensors().lora_bias; }  ///< b_B, length d (or empty)
  /// Mutable b_B (never resize it: use set_lora_bias).
  Vector& lora_bias() { return tensors().lora_bias; }
  const Vector& grad_lora_bias() const { return tensors().grad_lora_bias; }  ///< dL/db_B
  /// Mutable dL/db_B.
  Vector& grad_lora_bias() { return tensors().grad_lora_bias; }

  /// Gives the adapter a bias on B, set to b (length d), with a zero gradient. Throws
  /// std::invalid_argument for a DoRA adapter (PEFT refuses lora_bias with DoRA too).
  void set_lora_bias(const Eigen::Ref<const Vector>& b);

  /// Removes the bias on B (its views become stale).
  void clear_lora_bias();

  /// H += s * b_B on every column (nothing without a lora bias): the bias part of the adapter,
  /// which a merged weight cannot hold.   H: d x n.
  void add_lora_bias_term(Eigen::Ref<Matrix> H) const;

  /// True when A, B, the lora bias, DoRA's magnitude and their gradients hold no NaN or infinity.
  /// O(r (d + k)): cheap every step.
  bool all_finite() const;

  /// Throws std::domain_error naming the first NaN or infinity in A, B, grad_A, grad_B, the lora
  /// bias or its gradient (matrix, element, value), e.g. "LoRAAdapter::check_finite: grad_B(3, 0)
  /// is nan".
  void check_finite(const char* where = "LoRAAdapter::check_finite") const;

  /// H = s * B * (A * X) + bias (bias: length d, or empty for none), overwriting H in one pass, so
  /// that a frozen product accumulated into H afterwards pays nothing extra for the adapter's
  /// memory traffic.   X: k x n,  H: d x n,  AX (scratch): r x n, holds A*X afterwards.
  template <typename Bias>
  void assign_forward(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H,
                      Eigen::Ref<Matrix> AX, const Eigen::MatrixBase<Bias>& bias) const {
    const auto& t = tensors();
    AX.setZero();
    detail::gemm_add(AX, t.A, X, T(1));                   // (r x k)(k x n): r*k*n
    detail::assign_low_rank(H, scaling_, t.B, AX, bias);  // (d x r)(r x n): d*r*n
    add_lora_bias_term(H);  // a second pass over H only for PEFT's rare lora_bias
  }

  // ---- one-hot inputs (an embedding: column j of X is e_{ids[j]}) -------------------------------
  // A X is then A's columns at the ids: a gather, O(r n), instead of an O(r k n) product, and
  // dA = s (B^T G) X^T touches only those columns.

  /// Makes grad_A column-sparse: from now on zero_grad, the optimizers and clip_grad_norm see only
  /// the columns a one-hot backward marked (accumulate_gradients_one_hot). A dense
  /// accumulate_gradients marks every column until the next zero_grad. Allocates k bytes and k
  /// indices once. zero_grad() is called first.
  void track_sparse_grad_A() {
    zero_grad();
    tensors().grad_A_columns.track(in_features());
  }
  /// The columns of grad_A that may be non-zero (`all` unless tracked).
  const ColumnSubset& grad_A_columns() const { return tensors().grad_A_columns; }

  /// H += s * B * (A * X) for one-hot X (column j = e_{ids[j]}): AX (r x n scratch) holds A's
  /// columns at the ids afterwards. O(r n + d r n). The ids must be in [0, k) (the caller checks).
  void add_forward_one_hot(const std::vector<std::int64_t>& ids, Eigen::Ref<Matrix> H,
                           Eigen::Ref<Matrix> AX) const;

  /// accumulate_gradients for one-hot X (column j = e_{ids[j]}): AX = A(:, ids), BtG = B^T G,
  ///   dB += s * G * AX^T                    (d x n)(n x r)
  ///   dA(:, ids[j]) += s * BtG(:, j)        r per id: O(r n), whatever k is
  /// marking the columns touched (see track_sparse_grad_A).
  void accumulate_gradients_one_hot(const std::vector<std::int64_t>& ids,
                                    const Eigen::Ref<const Matrix>& G, Eigen::Ref<Matrix> AX,
                                    Eigen::Ref<Matrix> BtG);

  /// Accumulates the gradients of L for G = dL/dH (cost O(n * r * (d + k)), no d x k matrix):
  ///   dB += s * G * (A X)^T              (d x n)(n x r)
  ///   dA += s * (B^T G) * X^T            (r x n)(n x k)
  ///   db_B += s * G * 1                  (with a lora bias: the row sums of G)
  /// AX and BtG are r x n scratch; BtG holds B^T G afterwards, for assign_input_gradient.
  void accumulate_gradients(const Eigen::Ref<const Matrix>& X, const Eigen::Ref<const Matrix>& G,
                            Eigen::Ref<Matrix> AX, Eigen::Ref<Matrix> BtG);

  /// dX = s * A^T * (B^T G), the adapter's share of dL/dX, overwriting dX in one pass (the frozen
  /// term W0^T G is accumulated after).   BtG: r x n,  dX: k x n.
  void assign_input_gradient(const Eigen::Ref<const Matrix>& BtG, Eigen::Ref<Matrix> dX) const;

 private:
  detail::AdapterTensors<T>& tensors() {
    detail::require_state(t_ != nullptr, "LoRAAdapter: this adapter was moved from");
    return *t_;
  }
  const detail::AdapterTensors<T>& tensors() const {
    detail::require_state(t_ != nullptr, "LoRAAdapter: this adapter was moved from");
    return *t_;
  }

  template <typename M>
  ParameterView<T> view(M& value, M& grad, std::string name, const TensorLifetime& life) {
    return {{value.data(), value.rows(), value.cols()},
            {grad.data(), grad.rows(), grad.cols()},
            std::move(name),
            t_,
            &life,
            life.generation,
            nullptr};
  }

  /// out(:, j) = M(:, ids[j]).
  static void gather_columns(const Matrix& M, const std::vector<std::int64_t>& ids,
                             Eigen::Ref<Matrix> out);

  LoRAConfig config_;
  T scaling_{};
  bool magnitude_pending_ = false;  // DoRA: m still waits for the row norms of a layer's W0
  bool init_pending_ = false;       // PiSSA/OLoRA/LoftQ: A, B still wait for a layer's W0
  Matrix A0_, B0_;                  // the initial factors of a PiSSA/OLoRA/LoftQ adapter
  std::shared_ptr<detail::AdapterTensors<T>> t_;  // shared with the parameter views
};

// The members with bodies, out of the class so that they are not inline: a file that sees
// `extern template class LoRAAdapter<T>` (lora/extern_templates.hpp) does not instantiate them.

template <typename T>
LoRAAdapter<T>::LoRAAdapter(Index out_features, Index in_features, const LoRAConfig& cfg)
    : config_(cfg), t_(std::make_shared<detail::AdapterTensors<T>>()) {
  detail::require(out_features >= 1 && in_features >= 1,
                  "LoRAAdapter: the weight must be at least 1 x 1, got ",
                  detail::shape_string(out_features, in_features));
  cfg.validate_for(out_features, in_features);
  scaling_ = scaling_as<T>(cfg);
  t_->A.resize(cfg.rank, in_features);
  t_->B.setZero(out_features, cfg.rank);
  Rng rng(cfg.seed);
  if (cfg.init == Init::Gaussian) {
    fill_normal(t_->A, rng, 0.0, 1.0 / cfg.rank);
  } else if (cfg.init == Init::KaimingUniform) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(in_features));
    fill_uniform(t_->A, rng, -bound, bound);
  } else if (cfg.init == Init::Orthogonal) {
    orthogonal_init<T>(out_features, in_features, cfg.rank, cfg.seed, t_->A, t_->B);
  } else {  // PiSSA, OLoRA, LoftQ: the factors come from W0 when the adapter joins a layer
    t_->A.setZero();
    init_pending_ = true;
  }
  if (cfg.use_dora) {
    t_->magnitude.setOnes(out_features);
    magnitude_pending_ = true;
  }
  zero_grad();
}

template <typename T>
LoRAAdapter<T>::LoRAAdapter(const LoRAAdapter& o)
    : config_(o.config_),
      scaling_(o.scaling_),
      magnitude_pending_(o.magnitude_pending_),
      init_pending_(o.init_pending_),
      A0_(o.A0_),
      B0_(o.B0_),
      t_(std::make_shared<detail::AdapterTensors<T>>()) {
  const auto& s = o.tensors();
  t_->A = s.A;
  t_->B = s.B;
  t_->grad_A = s.grad_A;
  t_->grad_B = s.grad_B;
  t_->lora_bias = s.lora_bias;
  t_->grad_lora_bias = s.grad_lora_bias;
  t_->magnitude = s.magnitude;
  t_->grad_magnitude = s.grad_magnitude;
  t_->grad_A_columns = s.grad_A_columns;
}

template <typename T>
LoRAAdapter<T>& LoRAAdapter<T>::operator=(const LoRAAdapter& o) {
  if (this == &o) return *this;
  if (!t_) t_ = std::make_shared<detail::AdapterTensors<T>>();
  const auto& s = o.tensors();
  auto& d = *t_;
  detail::assign_tensor(d.A, s.A, d.A_life);
  detail::assign_tensor(d.grad_A, s.grad_A, d.A_life);
  detail::assign_tensor(d.B, s.B, d.B_life);
  detail::assign_tensor(d.grad_B, s.grad_B, d.B_life);
  detail::assign_tensor(d.lora_bias, s.lora_bias, d.lora_bias_life);
  detail::assign_tensor(d.grad_lora_bias, s.grad_lora_bias, d.lora_bias_life);
  detail::assign_tensor(d.magnitude, s.magnitude, d.magnitude_life);
  detail::assign_tensor(d.grad_magnitude, s.grad_magnitude, d.magnitude_life);
  d.grad_A_columns = s.grad_A_columns;
  config_ = o.config_;
  scaling_ = o.scaling_;
  magnitude_pending_ = o.magnitude_pending_;
  init_pending_ = o.init_pending_;
  A0_ = o.A0_;
  B0_ = o.B0_;
  return *this;
}

template <typename T>
void LoRAAdapter<T>::set_weights(const Eigen::Ref<const Matrix>& A,
                                 const Eigen::Ref<const Matrix>& B) {
  detail::require_shape("LoRAAdapter::set_weights", "A", A, rank(), in_features());
  detail::require_shape("LoRAAdapter::set_weights", "B", B, out_features(), rank());
  tensors().A = A;
  tensors().B = B;
  init_pending_ = false;
}

template <typename T>
void LoRAAdapter<T>::set_initial_factors(const Eigen::Ref<const Matrix>& A,
                                         const Eigen::Ref<const Matrix>& B) {
  set_weights(A, B);
  A0_ = A;
  B0_ = B;
}

template <typename T>
void LoRAAdapter<T>::zero_grad() {
  auto& t = tensors();
  ColumnSubset& cols = t.grad_A_columns;
  if (cols.sparse() && t.grad_A.rows() == t.A.rows() && t.grad_A.cols() == t.A.cols()) {
    for (Index j : cols.list) t.grad_A.col(j).setZero();
  } else {
    t.grad_A.setZero(t.A.rows(), t.A.cols());
  }
  cols.clear();
  t.grad_B.setZero(t.B.rows(), t.B.cols());
  t.grad_lora_bias.setZero(t.lora_bias.size());
  t.grad_magnitude.setZero(t.magnitude.size());
}

template <typename T>
std::vector<ParameterView<T>> LoRAAdapter<T>::parameters(const std::string& prefix) {
  auto& t = tensors();
  std::vector<ParameterView<T>> out;
  out.reserve(4);
  out.push_back(view(t.A, t.grad_A, prefix + "A", t.A_life));
  out.back().columns = &t.grad_A_columns;  // dense unless track_sparse_grad_A()
  out.push_back(view(t.B, t.grad_B, prefix + "B", t.B_life));
  if (has_lora_bias())
    out.push_back(view(t.lora_bias, t.grad_lora_bias, prefix + "lora_bias", t.lora_bias_life));
  if (uses_dora())
    out.push_back(view(t.magnitude, t.grad_magnitude, prefix + "magnitude", t.magnitude_life));
  return out;
}

template <typename T>
void LoRAAdapter<T>::set_magnitude(const Eigen::Ref<const Vector>& m) {
  detail::require(uses_dora(),
                  "LoRAAdapter::set_magnitude: this adapter is not a DoRA adapter "
                  "(config().use_dora is false)");
  detail::require(m.size() == out_features(), "LoRAAdapter::set_magnitude: m must have length ",
                  out_features(), " (out_features), got ", m.size());
  tensors().magnitude = m;
  magnitude_pending_ = false;
}

template <typename T>
void LoRAAdapter<T>::set_lora_bias(const Eigen::Ref<const Vector>& b) {
  detail::require(!uses_dora(),
                  "LoRAAdapter::set_lora_bias: a DoRA adapter has no lora bias (PEFT refuses "
                  "lora_bias=True with use_dora=True)");
  detail::require(b.size() == out_features(),
                  "LoRAAdapter::set_lora_bias: the bias must have length ", out_features(),
                  " (out_features), got ", b.size());
  auto& t = tensors();
  detail::assign_tensor(t.lora_bias, Vector(b), t.lora_bias_life);
  detail::assign_tensor(t.grad_lora_bias, Vector(Vector::Zero(b.size())), t.lora_bias_life);
}

template <typename T>
void LoRAAdapter<T>::clear_lora_bias() {
  auto& t = tensors();
  if (t.lora_bias.size() != 0) ++t.lora_bias_life.generation;
  t.lora_bias.resize(0);
  t.grad_lora_bias.resize(0);
}

template <typename T>
void LoRAAdapter<T>::add_lora_bias_term(Eigen::Ref<Matrix> H) const {
  if (has_lora_bias()) H.colwise() += scaling_ * tensors().lora_bias;
}

template <typename T>
bool LoRAAdapter<T>::all_finite() const {
  const auto& t = tensors();
  return t.A.allFinite() && t.B.allFinite() && t.grad_A.allFinite() && t.grad_B.allFinite() &&
         t.lora_bias.allFinite() && t.grad_lora_bias.allFinite() && t.magnitude.allFinite() &&
         t.grad_magnitude.allFinite();
}

template <typename T>
void LoRAAdapter<T>::check_finite(const char* where) const {
  const auto& t = tensors();
  detail::require_finite(where, "A", t.A);
  detail::require_finite(where, "B", t.B);
  detail::require_finite(where, "grad_A", t.grad_A);
  detail::require_finite(where, "grad_B", t.grad_B);
  detail::require_finite(where, "lora_bias", t.lora_bias);
  detail::require_finite(where, "grad_lora_bias", t.grad_lora_bias);
  detail::require_finite(where, "magnitude", t.magnitude);
  detail::require_finite(where, "grad_magnitude", t.grad_magnitude);
}

template <typename T>
void LoRAAdapter<T>::add_forward_one_hot(const std::vector<std::int64_t>& ids, Eigen::Ref<Matrix> H,
                                         Eigen::Ref<Matrix> AX) const {
  const auto& t = tensors();
  gather_columns(t.A, ids, AX);
  detail::gemm_add(H, t.B, AX, scaling_);  // (d x r)(r x n)
}

template <typename T>
void LoRAAdapter<T>::accumulate_gradients_one_hot(const std::vector<std::int64_t>& ids,
                                                  const Eigen::Ref<const Matrix>& G,
                                                  Eigen::Ref<Matrix> AX, Eigen::Ref<Matrix> BtG) {
  auto& t = tensors();
  gather_columns(t.A, ids, AX);
  BtG.setZero();
  detail::gemm_add(BtG, t.B.transpose(), G, T(1));          // (r x d)(d x n)
  detail::gemm_add(t.grad_B, G, AX.transpose(), scaling_);  // (d x n)(n x r)
  for (std::size_t j = 0; j < ids.size(); ++j) {
    const Index c = static_cast<Index>(ids[j]);
    t.grad_A.col(c).noalias() += scaling_ * BtG.col(static_cast<Index>(j));
    t.grad_A_columns.mark(c);
  }
  if (has_lora_bias()) t.grad_lora_bias.noalias() += scaling_ * G.rowwise().sum();
}

template <typename T>
void LoRAAdapter<T>::accumulate_gradients(const Eigen::Ref<const Matrix>& X,
                                          const Eigen::Ref<const Matrix>& G, Eigen::Ref<Matrix> AX,
                                          Eigen::Ref<Matrix> BtG) {
  auto& t = tensors();
  t.grad_A_columns.mark_all();  // a dense X: any column of dA may change
  // Products on Eigen's kernel through detail::gemm_add: no allocation, no copy for a transpose.
  AX.setZero();
  detail::gemm_add(AX, t.A, X, T(1));  // (r x k)(k x n)
  BtG.setZero();
  detail::gemm_add(BtG, t.B.transpose(), G, T(1));           // (r x d)(d x n)
  detail::gemm_add(t.grad_B, G, AX.transpose(), scaling_);   // (d x n)(n x r)
  detail::gemm_add(t.grad_A, BtG, X.transpose(), scaling_);  // (r x n)(n x k)
  if (has_lora_bias()) t.grad_lora_bias.noalias() += scaling_ * G.rowwise().sum();  // s * G * 1
}

template <typename T>
void LoRAAdapter<T>::assign_input_gradient(const Eigen::Ref<const Matrix>& BtG,
                                           Eigen::Ref<Matrix> dX) const {
  detail::assign_low_rank(dX, scaling_, tensors().A.transpose(), BtG,
                          Vector());  // (k x r)(r x n)
}

template <typename T>
void LoRAAdapter<T>::gather_columns(const Matrix& M, const std::vector<std::int64_t>& ids,
                                    Eigen::Ref<Matrix> out) {
  for (std::size_t j = 0; j < ids.size(); ++j)
    out.col(static_cast<Index>(j)) = M.col(static_cast<Index>(ids[j]));
}

}  // namespace lora
