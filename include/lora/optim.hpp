// Optimizers over trainable tensors only (the adapters' A and B, a bias a trainer chooses to
// train): SGD with momentum / Nesterov / weight decay and AdamW, with PyTorch's update rules
// (torch.optim.SGD and torch.optim.AdamW), plus clipping by global gradient norm.
//
// A ParameterView (parameter.hpp) is a (value, gradient) pair of Eigen::Maps onto storage owned
// elsewhere (an adapter, a trainer's own matrices). Optimizers keep state only for the views they
// are given, so a frozen W0 has no optimizer state and is never written. State is allocated when
// the optimizer is built: step() allocates nothing. Every call checks first that no view is stale
// (its adapter replaced by one of another shape, or destroyed) and throws std::logic_error naming
// it, before anything is updated.
//
// A view with a column-sparse gradient (ParameterView::columns: an embedding's A, whose batch
// touches only the columns of its token ids) is updated lazily: only the columns marked since the
// last zero_grad are stepped, as torch.optim.SparseAdam and TensorFlow's LazyAdam do, so a step
// costs O(r n) for n ids instead of O(r k) for a k-token vocabulary. An unmarked column keeps its
// value and its moments (dense AdamW would still move it by its momentum and decay it); where the
// exact dense update is wanted, take the dense views (LoRAEmbedding::parameters(false)).
#pragma once

#include "lora/detail/check.hpp"
#include "lora/detail/compiled_mode.hpp"
#include "lora/parameter.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace lora {

namespace detail {

/// Throws std::logic_error naming the first stale view; nothing is touched before the check.
template <typename T>
void require_valid(const char* where, const std::vector<ParameterView<T>>& params) {
  for (const auto& p : params) p.require_valid(where);
}

}  // namespace detail

/// Sets every gradient to zero (a trainer's zero_grad over all its layers at once).
template <typename T>
void zero_grad(const std::vector<ParameterView<T>>& params) {
  detail::require_valid("lora::zero_grad", params);
  for (const auto& p : params) {
    auto grad = p.grad;  // a copy of the view, writable: the storage is not the vector's
    if (p.sparse_columns()) {
      for (Eigen::Index j : p.columns->list) grad.col(j).setZero();
    } else {
      grad.setZero();
    }
    if (p.columns != nullptr) p.columns->clear();
  }
}

/// Number of trainable scalars in params.
template <typename T>
Eigen::Index parameter_count(const std::vector<ParameterView<T>>& params) {
  Eigen::Index n = 0;
  for (const auto& p : params) n += p.value.size();
  return n;
}

/// Scales all gradients together so that their global L2 norm is at most max_norm, as
/// torch.nn.utils.clip_grad_norm_: with N = sqrt(sum ||g_i||^2), every g_i *= max_norm / (N + 1e-6)
/// when that factor is below 1. Returns N, the norm before clipping (computed in double, so any
/// finite gradients give their true norm; returned as T, infinity if N exceeds T's range). Throws
/// std::invalid_argument for a negative or non-finite max_norm, and std::domain_error (gradients
/// left untouched) when a gradient holds NaN or infinity, or N overflows double: a non-finite
/// gradient must not be scaled into the weights unnoticed.
template <typename T>
T clip_grad_norm(const std::vector<ParameterView<T>>& params, T max_norm) {
  detail::require(std::isfinite(static_cast<double>(max_norm)) && max_norm >= T(0),
                  "lora::clip_grad_norm: max_norm must be finite and >= 0, got ", max_norm);
  detail::require_valid("lora::clip_grad_norm", params);
  // N in double from the elements: a tensor's norm taken in T first overflows float at 1e20
  // (squared); squares beyond double (1e200) are summed as amax * sqrt(sum (g / amax)^2).
  // A column-sparse gradient (an embedding's A) is zero outside its listed columns: only those
  // are read.
  const auto each_block = [](const ParameterView<T>& p, auto&& f) {
    if (p.sparse_columns()) {
      for (Eigen::Index j : p.columns->list) f(p.grad.col(j));
    } else {
      f(p.grad);
    }
  };
  double amax = 0;
  for (const auto& p : params)
    each_block(p, [&](const auto& g) {
      if (!g.allFinite())
        throw std::domain_error(
            detail::concat("lora::clip_grad_norm: a gradient holds NaN or infinity; the gradients "
                           "were left unscaled"));
      if (g.size() != 0) amax = std::max(amax, static_cast<double>(g.cwiseAbs().maxCoeff()));
    });
  double sum_sq = 0;
  for (const auto& p : params)
    each_block(p, [&](const auto& g) { sum_sq += g.template cast<double>().squaredNorm(); });
  double norm = std::sqrt(sum_sq);
  if (!std::isfinite(norm) && amax > 0) {  // squares beyond double (T = double): scale them
    sum_sq = 0;
    for (const auto& p : params)
      each_block(
          p, [&](const auto& g) { sum_sq += (g.template cast<double>() / amax).squaredNorm(); });
    norm = amax * std::sqrt(sum_sq);
  }
  if (!std::isfinite(norm)) {
    throw std::domain_error(
        detail::concat("lora::clip_grad_norm: the gradient norm overflows double (largest element ",
                       amax, "); the gradients were left unscaled"));
  }
  const double coef = static_cast<double>(max_norm) / (norm + 1e-6);
  if (coef < 1.0) {
    for (const auto& p : params) {
      auto grad = p.grad;  // a copy of the view, writable
      if (p.sparse_columns()) {
        for (Eigen::Index j : p.columns->list) grad.col(j) *= static_cast<T>(coef);
      } else {
        grad *= static_cast<T>(coef);
      }
    }
  }
  return static_cast<T>(norm);
}

namespace detail {

/// 'A' or 'B' for a view named "A", "B", "<prefix>.A" or "<prefix>.B" (an adapter's factors, see
/// LoRAAdapter::parameters), else 0: which LoRA factor a parameter is, for LoRA+ and LoRA-FA.
inline char factor_role(const std::string& name) {
  if (name.empty()) return 0;
  const char last = name.back();
  if (last != 'A' && last != 'B') return 0;
  if (name.size() == 1 || name[name.size() - 2] == '.') return last;
  return 0;
}

LORA_FUNC void require_finite_option(const char* where, const char* name, double v);

#if LORA_WITH_BODIES
LORA_FUNC void require_finite_option(const char* where, const char* name, double v) {
  require(std::isfinite(v), where, ": ", name, " must be finite, got ", v);
}
#endif

/// Every view well-formed (grad the shape of value, the two apart) and no tensor given twice: a
/// repeated parameter would be stepped twice per step().
template <typename T>
void validate_parameters(const char* where, const std::vector<ParameterView<T>>& params) {
  for (std::size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    require_shape(where, "a parameter's grad", p.grad, p.value.rows(), p.value.cols());
    require(!overlaps(p.value, p.grad), where, ": parameter ", i,
            ": value and grad must not share memory");
    for (std::size_t j = 0; j < i; ++j) {
      const auto& q = params[j];
      require(!overlaps(p.value, q.value) && !overlaps(p.value, q.grad) &&
                  !overlaps(p.grad, q.value) && !overlaps(p.grad, q.grad),
              where, ": parameters ", j, " and ", i, " share memory (a tensor given twice?)");
    }
  }
}

}  // namespace detail

/// Options of SGD, with torch.optim.SGD's meaning (dampening is 0).
struct SGDOptions {
  double lr = 1e-2;         ///< learning rate, >= 0
  double momentum = 0;      ///< mu, in [0, 1)
  double weight_decay = 0;  ///< L2 penalty added to the gradient (coupled), >= 0
  bool nesterov = false;    ///< Nesterov momentum; needs momentum > 0

  /// Throws std::invalid_argument naming the first bad option.
  void validate() const;
};

#if LORA_WITH_BODIES
LORA_FUNC void SGDOptions::validate() const {
  constexpr const char* where = "lora::SGDOptions";
  detail::require_finite_option(where, "lr", lr);
  detail::require_finite_option(where, "momentum", momentum);
  detail::require_finite_option(where, "weight_decay", weight_decay);
  detail::require(lr >= 0, where, ": lr must be >= 0, got ", lr);
  detail::require(momentum >= 0 && momentum < 1, where, ": momentum must be in [0, 1), got ",
                  momentum);
  detail::require(weight_decay >= 0, where, ": weight_decay must be >= 0, got ", weight_decay);
  detail::require(!nesterov || momentum > 0, where,
                  ": nesterov needs momentum > 0, got momentum = ", momentum);
}
#endif

/// Stochastic gradient descent, torch.optim.SGD (dampening 0, maximize false). Per step, for each
/// parameter p with gradient g:
///   g <- g + wd * p
///   b <- mu * b + g                 (b starts at 0, so the first step stores b = g, as PyTorch)
///   g <- g + mu * b  if nesterov,  else g <- b            (when mu > 0)
///   p <- p - lr * g
/// The gradients themselves are not modified.
template <typename T>
class SGD {
 public:
  /// A dense T matrix (the optimizer's state per parameter).
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;

  /// An optimizer over `params` (views of tensors owned elsewhere; see parameter.hpp). Throws
  /// std::invalid_argument for a bad option or a tensor given twice. Allocates its state here.
  explicit SGD(std::vector<ParameterView<T>> params, SGDOptions options = {});

  /// One update of every parameter from its current gradient; allocates nothing.
  void step();

  /// Sets the gradient of every parameter to zero.
  void zero_grad();

  /// Changes the learning rate (for a schedule); throws std::invalid_argument unless finite, >= 0.
  void set_learning_rate(double lr);
  /// The learning rate in use.
  double learning_rate() const { return options_.lr; }
  /// The options in use.
  const SGDOptions& options() const { return options_; }
  /// The number of step() calls so far.
  long long step_count() const { return steps_; }
  /// The parameters this optimizer updates.
  const std::vector<ParameterView<T>>& parameters() const { return params_; }
  /// The momentum buffer of parameter i (empty when momentum is 0).
  const Matrix& momentum_buffer(std::size_t i) const {
    static const Matrix empty;
    return options_.momentum > 0 ? momentum_.at(i) : empty;
  }

  /// Restores a resumed run's state: the step count and, with momentum, one buffer per parameter
  /// shaped as it (none without momentum). Throws std::invalid_argument (the optimizer unchanged)
  /// for a negative count, a wrong number of buffers or a wrong shape.
  void load_state(long long step_count, const std::vector<Matrix>& momentum);

 private:
  std::vector<ParameterView<T>> params_;
  SGDOptions options_;
  std::vector<Matrix> momentum_;
  long long steps_ = 0;
};

// The members with bodies, out of the class so that they are not inline: a file that sees
// `extern template class SGD<T>` (lora/extern_templates.hpp) does not instantiate them.

template <typename T>
SGD<T>::SGD(std::vector<ParameterView<T>> params, SGDOptions options)
    : params_(std::move(params)), options_(options) {
  options_.validate();
  detail::validate_parameters("lora::SGD", params_);
  if (options_.momentum > 0) {
    momentum_.reserve(params_.size());
    for (const auto& p : params_) momentum_.push_back(Matrix::Zero(p.value.rows(), p.value.cols()));
  }
}

template <typename T>
void SGD<T>::step() {
  detail::require_valid("lora::SGD::step", params_);
  const T lr = static_cast<T>(options_.lr);
  const T mu = static_cast<T>(options_.momentum);
  const T wd = static_cast<T>(options_.weight_decay);
  for (std::size_t i = 0; i < params_.size(); ++i) {
    ParameterView<T>& view = params_[i];
    Eigen::Map<Matrix> b(momentum_.empty() ? nullptr : momentum_[i].data(), view.value.rows(),
                         view.value.cols());
    auto update = [&](auto p, auto g, auto b) {
      if (options_.momentum == 0) {
        p -= lr * (g + wd * p);  // coefficient-wise: reading p while writing it is safe
        return;
      }
      b = mu * b + (g + wd * p);
      if (options_.nesterov) {
        p -= lr * ((g + wd * p) + mu * b);
      } else {
        p -= lr * b;
      }
    };
    if (view.sparse_columns()) {  // lazily: only the columns with a gradient
      for (Eigen::Index j : view.columns->list)
        update(view.value.col(j), view.grad.col(j), b.col(j));
    } else {
      update(view.value.block(0, 0, view.value.rows(), view.value.cols()),
             view.grad.block(0, 0, view.grad.rows(), view.grad.cols()),
             b.block(0, 0, b.rows(), b.cols()));
    }
  }
  ++steps_;
}

template <typename T>
void SGD<T>::zero_grad() {
  lora::zero_grad(params_);
}

template <typename T>
void SGD<T>::set_learning_rate(double lr) {
  SGDOptions o = options_;
  o.lr = lr;
  o.validate();
  options_ = o;
}

template <typename T>
void SGD<T>::load_state(long long step_count, const std::vector<Matrix>& momentum) {
  constexpr const char* where = "lora::SGD::load_state";
  detail::require(step_count >= 0, where, ": the step count must be >= 0, got ", step_count);
  detail::require(momentum.size() == momentum_.size(), where, ": ", momentum_.size(),
                  " momentum buffers expected, got ", momentum.size());
  for (std::size_t i = 0; i < momentum_.size(); ++i)
    detail::require_shape(where, "a momentum buffer", momentum[i], params_[i].value.rows(),
                          params_[i].value.cols());
  for (std::size_t i = 0; i < momentum_.size(); ++i) momentum_[i] = momentum[i];
  steps_ = step_count;
}

/// Options of AdamW, with torch.optim.AdamW's meaning and defaults (amsgrad off).
struct AdamWOptions {
  double lr = 1e-3;            ///< learning rate, >= 0
  double beta1 = 0.9;          ///< first-moment decay, in [0, 1)
  double beta2 = 0.999;        ///< second-moment decay, in [0, 1)
  double eps = 1e-8;           ///< added to sqrt(v_hat), >= 0
  double weight_decay = 1e-2;  ///< decoupled decay, >= 0
  /// LoRA+ (arXiv 2402.12354; PEFT's create_loraplus_optimizer `loraplus_lr_ratio`): parameters
  /// whose view is named B (an adapter's "B", or "<prefix>B") train with lr * loraplus_lr_ratio,
  /// the others with lr. 1 turns it off; the paper suggests 16. > 0.
  double loraplus_lr_ratio = 1.0;
  /// LoRA-FA's frozen A (arXiv 2308.03303): parameters whose view is named A (an adapter's "A",
  /// or "<prefix>A") are not updated (their moments stay zero). (PEFT's LoRA-FA optimizer also
  /// projects B's gradient with (A A^T)^-1 / s^2; this option only freezes A.)
  bool freeze_A = false;

  /// Throws std::invalid_argument naming the first bad option.
  void validate() const;
};

#if LORA_WITH_BODIES
LORA_FUNC void AdamWOptions::validate() const {
  constexpr const char* where = "lora::AdamWOptions";
  detail::require_finite_option(where, "loraplus_lr_ratio", loraplus_lr_ratio);
  detail::require(loraplus_lr_ratio > 0, where, ": loraplus_lr_ratio must be > 0, got ",
                  loraplus_lr_ratio);
  detail::require_finite_option(where, "lr", lr);
  detail::require_finite_option(where, "beta1", beta1);
  detail::require_finite_option(where, "beta2", beta2);
  detail::require_finite_option(where, "eps", eps);
  detail::require_finite_option(where, "weight_decay", weight_decay);
  detail::require(lr >= 0, where, ": lr must be >= 0, got ", lr);
  detail::require(beta1 >= 0 && beta1 < 1, where, ": beta1 must be in [0, 1), got ", beta1);
  detail::require(beta2 >= 0 && beta2 < 1, where, ": beta2 must be in [0, 1), got ", beta2);
  detail::require(eps >= 0, where, ": eps must be >= 0, got ", eps);
  detail::require(weight_decay >= 0, where, ": weight_decay must be >= 0, got ", weight_decay);
}
#endif

/// Adam with decoupled weight decay (Loshchilov & Hutter, arXiv 1711.05101), torch.optim.AdamW
/// (amsgrad false). At step t = 1, 2, ..., for each parameter p with gradient g:
///   p <- p * (1 - lr * wd)
///   m <- beta1 * m + (1 - beta1) * g          v <- beta2 * v + (1 - beta2) * g^2
///   p <- p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
/// m and v start at 0. The scalar factors are computed in double, the tensors in T.
template <typename T>
class AdamW {
 public:
  /// A dense T matrix (the optimizer's state per parameter).
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;

  /// An optimizer over `params` (views of tensors owned elsewhere; see parameter.hpp). Throws
  /// std::invalid_argument for a bad option or a tensor given twice. Allocates its state here.
  explicit AdamW(std::vector<ParameterView<T>> params, AdamWOptions options = {});

  /// One update of every parameter from its current gradient; allocates nothing.
  void step();

  /// Sets the gradient of every parameter to zero.
  void zero_grad();

  /// Changes the learning rate (for a schedule); throws std::invalid_argument unless finite, >= 0.
  void set_learning_rate(double lr);
  /// The learning rate in use.
  double learning_rate() const { return options_.lr; }
  /// The options in use.
  const AdamWOptions& options() const { return options_; }
  /// The number of step() calls so far.
  long long step_count() const { return steps_; }
  /// The parameters this optimizer updates.
  const std::vector<ParameterView<T>>& parameters() const { return params_; }
  const Matrix& first_moment(std::size_t i) const { return m_.at(i); }   ///< m of parameter i
  const Matrix& second_moment(std::size_t i) const { return v_.at(i); }  ///< v of parameter i

  /// Restores a resumed run's state (save_optimizer_state / load_optimizer_state in
  /// optimizer_state.hpp do it through a file): the step count and m, v per parameter, shaped as
  /// the parameters. The next step() then continues bit for bit as the saved run would have.
  /// Throws std::invalid_argument (the optimizer unchanged) for a negative count, a wrong number
  /// of tensors or a shape that differs from its parameter's.
  void load_state(long long step_count, const std::vector<Matrix>& m, const std::vector<Matrix>& v);

 private:
  std::vector<ParameterView<T>> params_;
  AdamWOptions options_;
  std::vector<Matrix> m_, v_;
  long long steps_ = 0;
};

// The members with bodies, out of the class so that they are not inline: a file that sees
// `extern template class AdamW<T>` (lora/extern_templates.hpp) does not instantiate them.

template <typename T>
AdamW<T>::AdamW(std::vector<ParameterView<T>> params, AdamWOptions options)
    : params_(std::move(params)), options_(options) {
  options_.validate();
  detail::validate_parameters("lora::AdamW", params_);
  m_.reserve(params_.size());
  v_.reserve(params_.size());
  for (const auto& p : params_) {
    m_.push_back(Matrix::Zero(p.value.rows(), p.value.cols()));
    v_.push_back(Matrix::Zero(p.value.rows(), p.value.cols()));
  }
}

template <typename T>
void AdamW<T>::step() {
  detail::require_valid("lora::AdamW::step", params_);
  ++steps_;
  const double t = static_cast<double>(steps_);
  const double bias1 = 1.0 - std::pow(options_.beta1, t);
  const double bias2 = 1.0 - std::pow(options_.beta2, t);
  const T b1 = static_cast<T>(options_.beta1), b2 = static_cast<T>(options_.beta2);
  const T sqrt_bias2 = static_cast<T>(std::sqrt(bias2));
  const T eps = static_cast<T>(options_.eps);
  auto update = [&](auto p, auto g, auto m, auto v, T decay, T step_size) {
    p *= decay;
    m = b1 * m + (T(1) - b1) * g;
    v = b2 * v + (T(1) - b2) * g.cwiseAbs2();
    // As PyTorch: p += -step_size * (m / (sqrt(v) / sqrt(1 - beta2^t) + eps)).
    p.array() -= step_size * (m.array() / (v.array().sqrt() / sqrt_bias2 + eps));
  };
  for (std::size_t i = 0; i < params_.size(); ++i) {
    const char role = detail::factor_role(params_[i].name);
    if (options_.freeze_A && role == 'A') continue;  // LoRA-FA
    const double lr = role == 'B' ? options_.lr * options_.loraplus_lr_ratio : options_.lr;
    const T decay = static_cast<T>(1.0 - lr * options_.weight_decay);
    const T step_size = static_cast<T>(lr / bias1);
    ParameterView<T>& view = params_[i];
    Matrix& m = m_[i];
    Matrix& v = v_[i];
    if (view.sparse_columns()) {  // lazily: only the columns with a gradient
      for (Eigen::Index j : view.columns->list)
        update(view.value.col(j), view.grad.col(j), m.col(j), v.col(j), decay, step_size);
    } else {
      update(view.value.block(0, 0, m.rows(), m.cols()), view.grad.block(0, 0, m.rows(), m.cols()),
             m.block(0, 0, m.rows(), m.cols()), v.block(0, 0, m.rows(), m.cols()), decay,
             step_size);
    }
  }
}

template <typename T>
void AdamW<T>::zero_grad() {
  lora::zero_grad(params_);
}

template <typename T>
void AdamW<T>::set_learning_rate(double lr) {
  AdamWOptions o = options_;
  o.lr = lr;
  o.validate();
  options_ = o;
}

template <typename T>
void AdamW<T>::load_state(long long step_count, const std::vector<Matrix>& m,
                          const std::vector<Matrix>& v) {
  constexpr const char* where = "lora::AdamW::load_state";
  detail::require(step_count >= 0, where, ": the step count must be >= 0, got ", step_count);
  detail::require(m.size() == params_.size() && v.size() == params_.size(), where, ": ",
                  params_.size(), " parameters but ", m.size(), " first and ", v.size(),
                  " second moments");
  for (std::size_t i = 0; i < params_.size(); ++i) {
    detail::require_shape(where, "a first moment", m[i], params_[i].value.rows(),
                          params_[i].value.cols());
    detail::require_shape(where, "a second moment", v[i], params_[i].value.rows(),
                          params_[i].value.cols());
  }
  for (std::size_t i = 0; i < params_.size(); ++i) {
    m_[i] = m[i];  // same shapes: copies into the existing storage
    v_[i] = v[i];
  }
  steps_ = step_count;
}

}  // namespace lora
