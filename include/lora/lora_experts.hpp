// LoRAExperts<T, Frozen>: LoRA on the expert weights of a mixture-of-experts layer, PEFT's
// ParamWrapper for a 3-D parameter (`target_parameters`, E x in x out). Each expert e is a frozen
// linear map y = W_e^T x (W_e: in x out as PEFT sees it) adapted by its own rank-r factors:
//   y = (W_e + s (B_e A_e)^T)^T x = W_e^T x + s B_e (A_e x)
// which is exactly a LoRA linear layer with weight W_e^T (out x in). So every expert is one
// MultiLoRALinear (the one adapter core: named adapters, the merge guarantee, views, optimizers,
// finite checks, any frozen storage), and this class only routes tokens to them: the tokens routed
// to an expert are gathered, go through that expert as one batch, and come back weighted by their
// gates (as the mixed-batch path groups columns by adapter). Only routed experts compute.
//
// PEFT's layout of one adapter (what A() and B() return and what its files hold):
//   A: (r E) x in,   expert e owns rows e r ... e r + r - 1
//   B: out x (r E),  reshaped (out, r, E): expert e owns columns j E + e, j = 0 .. r-1
//   delta_e = s (B_e A_e)^T = einsum("o r e, e r i -> e i o")
// As PEFT's ParamWrapper: no dropout, no DoRA, no lora bias.
#pragma once

#include "lora/adapter.hpp"
#include "lora/config.hpp"
#include "lora/dense_frozen_weight.hpp"
#include "lora/detail/check.hpp"
#include "lora/multi_lora_linear.hpp"
#include "lora/parameter.hpp"
#include "lora/workspace.hpp"

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace lora {

/// Each token's experts and gate weights, from the caller's router: token t chose experts
/// experts[t top_k + j] with gates[t top_k + j], j < top_k (gates empty: all 1).
template <typename T>
struct ExpertRouting {
  Eigen::Index top_k = 1;    ///< experts per token
  std::vector<int> experts;  ///< top_k n expert indices, token-major
  std::vector<T> gates;      ///< top_k n gate weights, or empty for 1
};

/// E frozen experts (each W_e: in x out, PEFT's view of a 3-D parameter E x in x out) with named
/// LoRA adapters in PEFT's ParamWrapper layout. forward(X, routing) takes X: in x n (a column per
/// token) and returns out x n: H(:, t) = sum_j g_tj (W_e^T + s B_e A_e) X(:, t), e = the j-th
/// expert of token t. A layer built from weights starts with one adapter, "default", active.
template <typename T, typename Frozen = DenseFrozenWeight<T>>
class LoRAExperts {
 public:
  using Expert = MultiLoRALinear<T, Frozen>;                        ///< one expert: the core
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;  ///< a dense T matrix
  using Index = Eigen::Index;                                       ///< Eigen's index type
  using Adapter = LoRAAdapter<T>;                                   ///< one expert's adapter
  using WorkspaceType = Workspace<T>;  ///< scratch for the out-parameter calls
  using Routing = ExpertRouting<T>;    ///< each token's experts and gates

  /// Wraps the experts' weights W[e] (in x out each, all the same shape) and adds the adapter
  /// "default" (see add_adapter), active.
  explicit LoRAExperts(const std::vector<Matrix>& W, const LoRAConfig& config = LoRAConfig{})
      : LoRAExperts(storages(W), config) {}

  /// Wraps storages of each W_e^T (out x in) built by the caller (bf16, ...), all the same shape,
  /// and adds "default" as above.
  LoRAExperts(std::vector<Frozen> frozen_transposed, const LoRAConfig& config) {
    detail::require(!frozen_transposed.empty(), "LoRAExperts: at least one expert is needed");
    const Index out = frozen_transposed.front().out_features();
    const Index in = frozen_transposed.front().in_features();
    for (auto& f : frozen_transposed)
      detail::require(f.out_features() == out && f.in_features() == in,
                      "LoRAExperts: every expert must have the same shape, got ",
                      detail::shape_string(f.in_features(), f.out_features()), " and ",
                      detail::shape_string(in, out), " (in x out)");
    experts_.reserve(frozen_transposed.size());
    for (auto& f : frozen_transposed) experts_.emplace_back(std::move(f));
    add_adapter(kDefaultName, config);
    set_active(kDefaultName);
  }

  Index num_experts() const { return static_cast<Index>(experts_.size()); }  ///< E
  Index in_features() const { return experts_.front().in_features(); }       ///< in
  Index out_features() const { return experts_.front().out_features(); }     ///< out
  /// Expert e's layer (its weight W_e^T, its adapters).
  const Expert& expert(Index e) const { return experts_.at(static_cast<std::size_t>(e)); }
  /// Expert e's layer, mutable.
  Expert& expert(Index e) { return experts_.at(static_cast<std::size_t>(e)); }

  // ---- adapters --------------------------------------------------------------------------------

  /// Adds adapter `name` to every expert: expert e's A (r x in) is drawn as config says with seed
  /// config.seed + e (PEFT draws its (r E) x in A at once with the same bound), B = 0. Throws
  /// std::invalid_argument for dropout, DoRA (PEFT's ParamWrapper refuses both) or a bad config.
  void add_adapter(const std::string& name, const LoRAConfig& config) {
    detail::require(config.dropout == 0.0 && !config.use_dora,
                    "LoRAExperts::add_adapter: expert weights take neither LoRA dropout nor DoRA "
                    "(PEFT's ParamWrapper refuses both)");
    for (Index e = 0; e < num_experts(); ++e) {
      LoRAConfig c = config;
      c.seed = config.seed + static_cast<std::uint64_t>(e);
      expert(e).add_adapter(name, c);
    }
  }
  /// Removes adapter `name` from every expert.
  void remove_adapter(const std::string& name) {
    for (auto& x : experts_) x.remove_adapter(name);
  }
  /// Makes `name` active in every expert (merged layers switch as AdapterLayer::set_active does).
  void set_active(const std::string& name) {
    for (auto& x : experts_) x.set_active(name);
  }
  /// No adapter: the frozen experts alone.
  void disable() {
    for (auto& x : experts_) x.disable();
  }
  /// True when adapter `name` exists.
  bool has_adapter(const std::string& name) const { return experts_.front().has_adapter(name); }
  /// The adapters' names, in the order added.
  std::vector<std::string> adapter_names() const { return experts_.front().adapter_names(); }
  /// The active adapter's name (std::logic_error when none).
  const std::string& active_name() const { return experts_.front().active_name(); }

  /// r of adapter `name` (every expert has the same).
  Index rank(const std::string& name) const { return experts_.front().adapter(name).rank(); }
  /// s of adapter `name`.
  T scaling(const std::string& name) const { return experts_.front().adapter(name).scaling(); }

  /// Adapter `name`'s A in PEFT's layout, (r E) x in (a copy).
  Matrix A(const std::string& name) const {
    return stack_A(name, [](const Adapter& a) -> const Matrix& { return a.A(); });
  }
  /// Adapter `name`'s B in PEFT's layout, out x (r E) (a copy).
  Matrix B(const std::string& name) const {
    return interleave_B(name, [](const Adapter& a) -> const Matrix& { return a.B(); });
  }
  /// dL/dA of adapter `name` in A's layout (a copy).
  Matrix grad_A(const std::string& name) const {
    return stack_A(name, [](const Adapter& a) -> const Matrix& { return a.grad_A(); });
  }
  /// dL/dB of adapter `name` in B's layout (a copy).
  Matrix grad_B(const std::string& name) const {
    return interleave_B(name, [](const Adapter& a) -> const Matrix& { return a.grad_B(); });
  }
  Matrix A() const { return A(active_name()); }            ///< the active adapter's A
  Matrix B() const { return B(active_name()); }            ///< the active adapter's B
  Matrix grad_A() const { return grad_A(active_name()); }  ///< the active adapter's dL/dA
  Matrix grad_B() const { return grad_B(active_name()); }  ///< the active adapter's dL/dB

  /// Sets adapter `name`'s factors from PEFT's layout (A: (r E) x in, B: out x (r E)). Throws
  /// std::invalid_argument for other shapes, std::logic_error while that adapter is merged.
  void set_weights(const std::string& name, const Eigen::Ref<const Matrix>& A,
                   const Eigen::Ref<const Matrix>& B) {
    const Index r = rank(name), E = num_experts();
    const detail::Where where{"LoRAExperts", "set_weights"};
    detail::require_shape(where, "A", A, r * E, in_features());
    detail::require_shape(where, "B", B, out_features(), r * E);
    detail::require_state(!(is_merged() && active_name() == name), where, ": adapter \"", name,
                          "\" is merged; call unmerge() first");
    for (Index e = 0; e < E; ++e) {
      Adapter& a = expert(e).adapter(name);
      a.A() = A.middleRows(e * r, r);
      for (Index j = 0; j < r; ++j) a.B().col(j) = B.col(j * E + e);
    }
  }

  /// Gives adapter `name` (adding it when missing) rank and scaling from `config` and the factors
  /// A ((r E) x in) and B (out x (r E)) in PEFT's layout, e.g. loaded from a file; each expert's
  /// views stay valid when its shapes do not change. Throws as set_weights.
  void replace_adapter(const std::string& name, const LoRAConfig& config,
                       const Eigen::Ref<const Matrix>& A, const Eigen::Ref<const Matrix>& B) {
    const Index E = num_experts(), r = config.rank;
    const detail::Where where{"LoRAExperts", "replace_adapter"};
    detail::require_shape(where, "A", A, r * E, in_features());
    detail::require_shape(where, "B", B, out_features(), r * E);
    std::vector<Adapter> parts;
    for (Index e = 0; e < E; ++e) {
      Adapter a(out_features(), in_features(), config);
      Matrix Be(out_features(), r);
      for (Index j = 0; j < r; ++j) Be.col(j) = B.col(j * E + e);
      a.set_weights(A.middleRows(e * r, r), Be);
      parts.push_back(std::move(a));
    }
    const bool present = has_adapter(name);
    for (Index e = 0; e < E; ++e) {
      if (present) {
        expert(e).replace_adapter(name, parts[static_cast<std::size_t>(e)]);
      } else {
        expert(e).add_adapter(name, std::move(parts[static_cast<std::size_t>(e)]));
      }
    }
  }

  /// Adapter `name` of every expert as optimizer views, "<name>.expert<e>.A" / ".B".
  std::vector<ParameterView<T>> parameters(const std::string& name) {
    std::vector<ParameterView<T>> out;
    for (Index e = 0; e < num_experts(); ++e)
      for (auto& v : expert(e).adapter(name).parameters(name + ".expert" + std::to_string(e) + "."))
        out.push_back(std::move(v));
    return out;
  }
  /// The active adapter's views.
  std::vector<ParameterView<T>> parameters() { return parameters(active_name()); }

  // ---- forward and backward --------------------------------------------------------------------

  /// H = the routed, gated experts' outputs (out x n) for X (in x n). See the class comment.
  Matrix forward(const Eigen::Ref<const Matrix>& X, const Routing& routing) const {
    Matrix H(out_features(), X.cols());
    WorkspaceType ws;
    forward(X, routing, H, ws);
    return H;
  }

  /// As above into H (out x n); allocation-free once ws has grown (with an allocation-free
  /// storage). Each expert runs once, on the tokens routed to it: O(sum_e n_e (in out + r (in +
  /// out))). Throws std::invalid_argument for a bad routing or shape.
  void forward(const Eigen::Ref<const Matrix>& X, const Routing& routing, Eigen::Ref<Matrix> H,
               WorkspaceType& ws) const {
    const detail::Where where{"LoRAExperts", "forward"};
    require_routing(where, X, routing);
    detail::require_shape(where, "H", H, out_features(), X.cols());
    H.setZero();
    for (Index e = 0; e < num_experts(); ++e) {
      const Index n_e = gather(X, routing, e, ws.get(Slot::GatheredInput, in_features(), 0), true);
      if (n_e == 0) continue;
      auto Xe = ws.get(Slot::GatheredInput, in_features(), n_e);
      gather(X, routing, e, Xe, false);
      auto Ye = ws.get(Slot::GatheredOutput, out_features(), n_e);
      expert(e).forward(Xe, Ye, ws);
      for_each_assignment(routing, e, [&](Index t, Index c, T g) { H.col(t) += g * Ye.col(c); });
    }
  }

  /// Accumulates the active adapter's gradients of every routed expert for G = dL/dH (out x n)
  /// and writes dX (in x n). The gates are the caller's and are held constant (their gradient,
  /// G(:, t) . y_e(t), needs the experts' outputs, which forward does not keep). Throws
  /// std::logic_error while merged or with no active adapter.
  void backward(const Eigen::Ref<const Matrix>& X, const Routing& routing,
                const Eigen::Ref<const Matrix>& G, Eigen::Ref<Matrix> dX, WorkspaceType& ws) {
    const detail::Where where{"LoRAExperts", "backward"};
    require_routing(where, X, routing);
    detail::require_shape(where, "G", G, out_features(), X.cols());
    detail::require_shape(where, "dX", dX, in_features(), X.cols());
    dX.setZero();
    for (Index e = 0; e < num_experts(); ++e) {
      const Index n_e = gather(X, routing, e, ws.get(Slot::GatheredInput, in_features(), 0), true);
      if (n_e == 0) continue;
      auto Xe = ws.get(Slot::GatheredInput, in_features(), n_e);
      gather(X, routing, e, Xe, false);
      auto Ge = ws.get(Slot::GatheredGrad, out_features(), n_e);
      for_each_assignment(routing, e, [&](Index t, Index c, T g) { Ge.col(c) = g * G.col(t); });
      auto dXe = ws.get(Slot::GatheredOutput, in_features(), n_e);
      expert(e).backward(Xe, Ge, dXe, ws);
      for_each_assignment(routing, e, [&](Index t, Index c, T) { dX.col(t) += dXe.col(c); });
    }
  }

  /// As above, returning dX (allocates).
  Matrix backward(const Eigen::Ref<const Matrix>& X, const Routing& routing,
                  const Eigen::Ref<const Matrix>& G) {
    Matrix dX(in_features(), X.cols());
    WorkspaceType ws;
    backward(X, routing, G, dX, ws);
    return dX;
  }

  /// Sets every expert's gradients to zero.
  void zero_grad() {
    for (auto& x : experts_) x.zero_grad();
  }

  // ---- merge -----------------------------------------------------------------------------------

  /// Merges the active adapter into every expert (W_e + s (B_e A_e)^T), with the core's guarantee
  /// per expert; all or nothing: if one expert refuses, those merged before are unmerged again.
  void merge() {
    Index e = 0;
    try {
      for (; e < num_experts(); ++e) expert(e).merge();
    } catch (...) {
      for (Index i = 0; i < e; ++i) expert(i).unmerge();
      throw;
    }
  }
  /// Gives every W_e back (exactly what merge() added is removed).
  void unmerge() {
    for (auto& x : experts_) x.unmerge();
  }
  /// True while merged.
  bool is_merged() const { return experts_.front().is_merged(); }

  /// Expert e's weight in use in PEFT's orientation, in x out: W_e, or W_e + delta_e while merged.
  Matrix weight(Index e) const { return expert(e).weight().transpose(); }
  /// delta_e = s (B_e A_e)^T (in x out) of the active adapter.
  Matrix delta_weight(Index e) const {
    const Adapter& a = expert(e).adapter(active_name());
    return (a.scaling() * a.B() * a.A()).transpose();
  }

  // ---- modes, health, counts -------------------------------------------------------------------

  /// Training mode (no effect on the computation: expert adapters take no dropout).
  void train(bool on = true) {
    for (auto& x : experts_) x.train(on);
  }
  /// Evaluation mode.
  void eval() { train(false); }
  /// True when every expert's adapters and weight are finite.
  bool all_finite() const {
    for (const auto& x : experts_)
      if (!x.all_finite()) return false;
    return true;
  }
  /// Throws std::domain_error naming the expert and the first NaN or infinity.
  void check_finite() const {
    for (Index e = 0; e < num_experts(); ++e) {
      try {
        expert(e).check_finite();
      } catch (const std::domain_error& err) {
        throw std::domain_error("LoRAExperts: expert " + std::to_string(e) + ": " + err.what());
      }
    }
  }
  /// Trainable parameters: every adapter's r E (in + out).
  Index trainable_parameter_count() const {
    Index n = 0;
    for (const auto& x : experts_) n += x.trainable_parameter_count();
    return n;
  }
  /// Frozen parameters: E in out.
  Index frozen_parameter_count() const {
    Index n = 0;
    for (const auto& x : experts_) n += x.frozen_parameter_count();
    return n;
  }

 private:
  static constexpr const char* kDefaultName = "default";

  /// The experts' r x in matrices get(adapter) stacked: expert e's rows are e r ... e r + r - 1.
  template <typename Get>
  Matrix stack_A(const std::string& name, Get get) const {
    const Index r = rank(name);
    Matrix out(r * num_experts(), in_features());
    for (Index e = 0; e < num_experts(); ++e)
      out.middleRows(e * r, r) = get(expert(e).adapter(name));
    return out;
  }

  /// The experts' out x r matrices get(adapter) interleaved: expert e's column j is j E + e.
  template <typename Get>
  Matrix interleave_B(const std::string& name, Get get) const {
    const Index r = rank(name), E = num_experts();
    Matrix out(out_features(), r * E);
    for (Index e = 0; e < E; ++e)
      for (Index j = 0; j < r; ++j) out.col(j * E + e) = get(expert(e).adapter(name)).col(j);
    return out;
  }

  static std::vector<Frozen> storages(const std::vector<Matrix>& W) {
    std::vector<Frozen> out;
    out.reserve(W.size());
    for (const auto& w : W) {
      detail::require(w.rows() >= 1 && w.cols() >= 1,
                      "LoRAExperts: each expert weight must be at least 1 x 1 (in x out), got ",
                      detail::shape_string(w.rows(), w.cols()));
      out.emplace_back(Matrix(w.transpose()));
    }
    return out;
  }

  void require_routing(const detail::Where& where, const Eigen::Ref<const Matrix>& X,
                       const Routing& routing) const {
    detail::require_shape(where, "X", X, in_features(), X.cols());
    const std::size_t want = static_cast<std::size_t>(routing.top_k * X.cols());
    detail::require(routing.top_k >= 1 && routing.experts.size() == want, where,
                    ": routing needs top_k >= 1 and top_k * n = ", want, " expert indices, got ",
                    routing.experts.size(), " (top_k ", routing.top_k, ")");
    detail::require(routing.gates.empty() || routing.gates.size() == want, where, ": routing has ",
                    routing.gates.size(), " gates; expected ", want, " or none");
    for (std::size_t i = 0; i < want; ++i) {
      detail::require(routing.experts[i] >= 0 && routing.experts[i] < num_experts(), where,
                      ": routing entry ", i, " names expert ", routing.experts[i],
                      "; valid are 0..", num_experts() - 1);
      detail::require(routing.gates.empty() || std::isfinite(double(routing.gates[i])), where,
                      ": gate ", i, " is not finite");
    }
  }

  /// Calls f(token, position among expert e's tokens, gate) for each assignment to expert e.
  template <typename F>
  static void for_each_assignment(const Routing& routing, Index e, F f) {
    const Index K = routing.top_k;
    const Index total = static_cast<Index>(routing.experts.size());
    for (Index i = 0, c = 0; i < total; ++i) {
      if (routing.experts[static_cast<std::size_t>(i)] != e) continue;
      f(i / K, c++, routing.gates.empty() ? T(1) : routing.gates[static_cast<std::size_t>(i)]);
    }
  }

  /// The number of tokens routed to e; unless count_only, their columns of X into Xe.
  static Index gather(const Eigen::Ref<const Matrix>& X, const Routing& routing, Index e,
                      Eigen::Map<Matrix> Xe, bool count_only) {
    Index n = 0;
    for_each_assignment(routing, e, [&](Index t, Index c, T) {
      if (!count_only) Xe.col(c) = X.col(t);
      ++n;
    });
    return n;
  }

  std::vector<Expert> experts_;
};

}  // namespace lora
