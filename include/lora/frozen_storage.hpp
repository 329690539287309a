// The frozen-storage contract: what a storage of the frozen weight W0 (d x k, out x in) provides
// to the layer. A layer instantiated with a type that misses a member fails to compile with a
// sentence naming that member (lora::check_frozen_storage<F>() below).
//
// Every storage (DenseFrozenWeight<float/double>, Bf16FrozenWeight, OneDnnFrozenWeight, ...) keeps
// the same promises:
//
//   using Scalar                     float or double: the type of X, H, G, dX and of the adapter.
//   using Matrix, Vector             Eigen::Matrix<Scalar, Dynamic, Dynamic> and <Scalar, Dynamic,
//   1>. bool allocation_free() const     true when the three products allocate nothing in steady
//   state
//                                    (the conformance tests hold the storage to it); may depend on
//                                    the back end chosen at run time.
//   Index out_features() const       d
//   Index in_features() const        k
//
//   Products (const: safe from many threads at once; outputs never alias inputs):
//   void multiply(X, H) const                 H = W X          X: k x n, H: d x n (overwritten)
//   void multiply_add(X, H) const             H += W X         (the layer writes its low-rank term
//                                                               and bias first, then accumulates)
//   void multiply_transposed_add(G, dX) const dX += W^T G      G: d x n, dX: k x n
//   with X, G as `const Eigen::Ref<const Matrix>&` and H, dX as `Eigen::Ref<Matrix>`. W is the
//   weight in use: W0, or the merged weight while merged. A storage may compute in a narrower type
//   (bf16, 4-bit) and must document its error bound.
//
//   Merge (the layer calls these; users call the layer's merge()/unmerge()):
//   void merge(Scalar s, B, A, g)    W = diag(g) (W0 + s B A)    B: d x r, A: r x k, g: d or empty
//                                    (empty g means all ones: plain LoRA; DoRA passes its
//                                    magnitude over the row norms). Throws std::domain_error and
//                                    leaves W exactly as it was when a merged element that was
//                                    finite in W0 is not finite in the storage's own type;
//                                    std::logic_error when already merged.
//   void unmerge(Scalar s, B, A, g)  W = W0 again. The layer passes exactly the arguments of the
//                                    matching merge() (it keeps a copy of the merged factors), so
//                                    a storage may undo the update arithmetically.
//   bool is_merged() const
//   MergeMode merge_mode() const     chosen once, at the storage's construction (the only place):
//                                    InPlace (unmerge within the documented rounding bound) or
//                                    ExactRestore (unmerge bit-exact). A storage that supports
//                                    only one mode refuses the other at construction.
//
//   Inspection:
//   Matrix weight() const            the weight in use, widened to Scalar, as a new d x k matrix
//                                    (for inspection and export: the layer never calls it on a
//                                    hot path).
//   bool all_finite() const          the weight in use holds no NaN or infinity; allocates nothing.
//   void row_norms(Eigen::Ref<Eigen::VectorXd> out) const
//                                    out(i) = ||row i of W0||_2 of the weight as stored, in double,
//                                    computed without a d x k temporary; std::logic_error while
//                                    merged (DoRA's norm of the frozen part).
//   std::size_t stored_bytes() const bytes held for the weight (W0 and any merged copy).
//
//   Rebase (PiSSA, OLoRA and LoftQ replace the base by a residual when their adapter joins):
//   void rebase(W)                   W0 = W (d x k, the same shape) as this storage stores a
//                                    weight (bf16 rounds it, NF4 quantizes it with its own
//                                    options); keeps the merge mode and back end.
//                                    std::logic_error while merged, std::invalid_argument for
//                                    another shape, std::domain_error where the storage cannot
//                                    hold W. W as `const Eigen::Ref<const Matrix>&`.
//
// Storages must also be copy- and move-constructible (a copy shares nothing with the original).
#pragma once

#include <Eigen/Core>

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

namespace lora {

/// How unmerge() gives W0 back. Chosen once, when the frozen storage is built.
enum class MergeMode {
  /// merge() adds s*B*A to W in place; unmerge() subtracts the same factors again, as PEFT does.
  /// No extra memory, but each cycle can move an element by a rounding error: after c cycles
  /// |W - W0| <= c * 2u * (|W0| + |s*B*A|) elementwise (u = unit roundoff of the stored type), and
  /// in practice far less (the errors are unbiased).
  InPlace,
  /// merge() keeps a pristine W0 beside the merged weight; unmerge() switches back, so W0 comes
  /// back bit for bit, at once. Costs a second d x k buffer once the layer has merged.
  ExactRestore,
};

namespace storage_detail {

template <typename F>
using MatrixOf = Eigen::Matrix<typename F::Scalar, Eigen::Dynamic, Eigen::Dynamic>;
template <typename F>
using VectorOf = Eigen::Matrix<typename F::Scalar, Eigen::Dynamic, 1>;
template <typename F>
using CRef = const Eigen::Ref<const MatrixOf<F>>&;
template <typename F>
using MRef = Eigen::Ref<MatrixOf<F>>;

// One detector per member: true when the expression is well-formed for F.
template <typename F, typename = void>
struct has_scalar : std::false_type {};
template <typename F>
struct has_scalar<F, std::enable_if_t<std::is_same_v<typename F::Scalar, float> ||
                                      std::is_same_v<typename F::Scalar, double>>>
    : std::true_type {};

#define LORA_STORAGE_DETECTOR(name, ...) \
  template <typename F, typename = void> \
  struct name : std::false_type {};      \
  template <typename F>                  \
  struct name<F, std::void_t<decltype(__VA_ARGS__)>> : std::true_type {};

LORA_STORAGE_DETECTOR(has_allocation_free, bool{std::declval<const F&>().allocation_free()})
LORA_STORAGE_DETECTOR(has_out_features, Eigen::Index{std::declval<const F&>().out_features()})
LORA_STORAGE_DETECTOR(has_in_features, Eigen::Index{std::declval<const F&>().in_features()})
LORA_STORAGE_DETECTOR(has_multiply, std::declval<const F&>().multiply(std::declval<CRef<F>>(),
                                                                      std::declval<MRef<F>>()))
LORA_STORAGE_DETECTOR(has_multiply_add,
                      std::declval<const F&>().multiply_add(std::declval<CRef<F>>(),
                                                            std::declval<MRef<F>>()))
LORA_STORAGE_DETECTOR(has_multiply_transposed_add,
                      std::declval<const F&>().multiply_transposed_add(std::declval<CRef<F>>(),
                                                                       std::declval<MRef<F>>()))
LORA_STORAGE_DETECTOR(
    has_merge, std::declval<F&>().merge(std::declval<typename F::Scalar>(), std::declval<CRef<F>>(),
                                        std::declval<CRef<F>>(),
                                        std::declval<const Eigen::Ref<const VectorOf<F>>&>()))
LORA_STORAGE_DETECTOR(
    has_unmerge, std::declval<F&>().unmerge(std::declval<typename F::Scalar>(),
                                            std::declval<CRef<F>>(), std::declval<CRef<F>>(),
                                            std::declval<const Eigen::Ref<const VectorOf<F>>&>()))
LORA_STORAGE_DETECTOR(has_is_merged, bool{std::declval<const F&>().is_merged()})
LORA_STORAGE_DETECTOR(has_merge_mode, MergeMode{std::declval<const F&>().merge_mode()})
LORA_STORAGE_DETECTOR(has_weight, MatrixOf<F>{std::declval<const F&>().weight()})
LORA_STORAGE_DETECTOR(has_all_finite, bool{std::declval<const F&>().all_finite()})
LORA_STORAGE_DETECTOR(
    has_row_norms, std::declval<const F&>().row_norms(std::declval<Eigen::Ref<Eigen::VectorXd>>()))
LORA_STORAGE_DETECTOR(has_stored_bytes, std::size_t{std::declval<const F&>().stored_bytes()})
LORA_STORAGE_DETECTOR(has_rebase, std::declval<F&>().rebase(std::declval<CRef<F>>()))

LORA_STORAGE_DETECTOR(has_gather_columns, std::declval<const F&>().gather_columns(
                                              std::declval<const std::vector<std::int64_t>&>(),
                                              std::declval<MRef<F>>()))

#undef LORA_STORAGE_DETECTOR

}  // namespace storage_detail

/// True when F provides every member of the frozen-storage contract (see the top of this file).
template <typename F>
inline constexpr bool is_frozen_storage_v = [] {
  using namespace storage_detail;
  if constexpr (!has_scalar<F>::value) {
    return false;
  } else {
    return has_allocation_free<F>::value && has_out_features<F>::value &&
           has_in_features<F>::value && has_multiply<F>::value && has_multiply_add<F>::value &&
           has_multiply_transposed_add<F>::value && has_merge<F>::value && has_unmerge<F>::value &&
           has_is_merged<F>::value && has_merge_mode<F>::value && has_weight<F>::value &&
           has_all_finite<F>::value && has_row_norms<F>::value && has_stored_bytes<F>::value &&
           has_rebase<F>::value && std::is_copy_constructible_v<F> &&
           std::is_move_constructible_v<F>;
  }
}();

/// Fails to compile, naming the first missing member, unless F keeps the frozen-storage contract.
/// Every layer calls it for its storage; a new storage can call it in its own test too.
template <typename F>
constexpr bool check_frozen_storage() {
  using namespace storage_detail;
  static_assert(has_scalar<F>::value,
                "lora: a frozen storage must declare `using Scalar = float;` (or double): the type "
                "of the layer's inputs, outputs and adapter. See lora/frozen_storage.hpp.");
  if constexpr (has_scalar<F>::value) {
    static_assert(has_allocation_free<F>::value,
                  "lora: a frozen storage must provide `bool allocation_free() const`: whether its "
                  "products allocate nothing in steady state.");
    static_assert(has_out_features<F>::value && has_in_features<F>::value,
                  "lora: a frozen storage must provide `Index out_features() const` and "
                  "`Index in_features() const` (d and k of the d x k weight).");
    static_assert(has_multiply<F>::value,
                  "lora: a frozen storage must provide `void multiply(const Eigen::Ref<const "
                  "Matrix>& X, Eigen::Ref<Matrix> H) const` computing H = W X.");
    static_assert(has_multiply_add<F>::value,
                  "lora: a frozen storage must provide `void multiply_add(const Eigen::Ref<const "
                  "Matrix>& X, Eigen::Ref<Matrix> H) const` computing H += W X.");
    static_assert(has_multiply_transposed_add<F>::value,
                  "lora: a frozen storage must provide `void multiply_transposed_add(const "
                  "Eigen::Ref<const Matrix>& G, Eigen::Ref<Matrix> dX) const` computing dX += W^T "
                  "G.");
    static_assert(has_merge<F>::value && has_unmerge<F>::value,
                  "lora: a frozen storage must provide `void merge(Scalar s, const "
                  "Eigen::Ref<const Matrix>& B, const Eigen::Ref<const Matrix>& A, const "
                  "Eigen::Ref<const Vector>& g)` (W = diag(g)(W0 + s B A)) and `unmerge` with the "
                  "same arguments.");
    static_assert(has_is_merged<F>::value && has_merge_mode<F>::value,
                  "lora: a frozen storage must provide `bool is_merged() const` and `MergeMode "
                  "merge_mode() const`.");
    static_assert(has_weight<F>::value,
                  "lora: a frozen storage must provide `Matrix weight() const`: the weight in use "
                  "as a new dense matrix.");
    static_assert(has_all_finite<F>::value,
                  "lora: a frozen storage must provide `bool all_finite() const` (no allocation).");
    static_assert(has_row_norms<F>::value,
                  "lora: a frozen storage must provide `void row_norms(Eigen::Ref<Eigen::VectorXd> "
                  "out) const`: the row norms of W0 as stored.");
    static_assert(has_stored_bytes<F>::value,
                  "lora: a frozen storage must provide `std::size_t stored_bytes() const`.");
    static_assert(has_rebase<F>::value,
                  "lora: a frozen storage must provide `void rebase(const Eigen::Ref<const "
                  "Matrix>& W)`: W0 = W as the storage stores it (PiSSA, OLoRA and LoftQ "
                  "residual bases).");
    static_assert(std::is_copy_constructible_v<F> && std::is_move_constructible_v<F>,
                  "lora: a frozen storage must be copy- and move-constructible.");
  }
  return true;
}

/// Fails to compile unless F also provides the column lookup a token-embedding layer needs:
/// `void gather_columns(const std::vector<std::int64_t>& ids, Eigen::Ref<Matrix> H) const`, with
/// H(:, j) = W(:, ids[j]) of the weight in use (DenseFrozenWeight and Bf16FrozenWeight have it).
template <typename F>
constexpr bool check_lookup_storage() {
  static_assert(storage_detail::has_gather_columns<F>::value,
                "lora: LoRAEmbedding needs a storage with `void gather_columns(const "
                "std::vector<std::int64_t>& ids, Eigen::Ref<Matrix> H) const` (H(:, j) = "
                "W(:, ids[j])): DenseFrozenWeight and Bf16FrozenWeight provide it.");
  return true;
}

}  // namespace lora
