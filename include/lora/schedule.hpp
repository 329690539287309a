// Learning-rate schedules with warm-up, as transformers' get_linear_schedule_with_warmup and
// get_cosine_schedule_with_warmup (a LambdaLR whose factor multiplies the base learning rate):
//   warm-up (step < w):  f = step / max(1, w)
//   linear:              f = max(0, (T - step) / max(1, T - w))
//   cosine:              f = max(0, 0.5 (1 + cos(pi * 2 c * (step - w) / max(1, T - w))))
// with w warm-up steps, T training steps and c cycles (0.5: one half-cosine down to 0).
// `step` counts the optimizer steps taken so far, as a LambdaLR's last_epoch does: the step with
// step_count() == t uses f(t), so the first update uses f(0) (0 with warm-up, as in transformers).
#pragma once

#include "lora/detail/check.hpp"
#include "lora/detail/compiled_mode.hpp"

#include <algorithm>
#include <cmath>

namespace lora {

/// A learning-rate schedule: base learning rate times a factor of the step.
class LRSchedule {
 public:
  /// What the factor does after the warm-up.
  enum class Kind {
    Linear,  ///< decays linearly to 0 at the last step
    Cosine,  ///< follows a cosine (half a period by default) down to 0
  };

  /// transformers.get_linear_schedule_with_warmup(optimizer, warmup_steps, training_steps) for
  /// an optimizer of learning rate `base_lr`. Throws std::invalid_argument for a negative or
  /// non-finite base_lr or negative step counts.
  static LRSchedule linear_with_warmup(double base_lr, long long warmup_steps,
                                       long long training_steps) {
    return LRSchedule(Kind::Linear, base_lr, warmup_steps, training_steps, 0.5);
  }

  /// transformers.get_cosine_schedule_with_warmup(optimizer, warmup_steps, training_steps,
  /// num_cycles) for an optimizer of learning rate `base_lr`; num_cycles = 0.5 decays to 0 once.
  static LRSchedule cosine_with_warmup(double base_lr, long long warmup_steps,
                                       long long training_steps, double num_cycles = 0.5) {
    return LRSchedule(Kind::Cosine, base_lr, warmup_steps, training_steps, num_cycles);
  }

  /// The factor f(step) that multiplies the base learning rate (see the top of this file).
  double factor(long long step) const;

  /// base_lr * factor(step): the learning rate of the update taken when `step` updates are done.
  double learning_rate(long long step) const { return base_lr_ * factor(step); }

  /// Sets the optimizer's learning rate for its next step():
  /// `optimizer.set_learning_rate(learning_rate(optimizer.step_count()))`. Call it before each
  /// step() (any lora optimizer, or a type with set_learning_rate and step_count).
  template <typename Optimizer>
  void apply(Optimizer& optimizer) const {
    optimizer.set_learning_rate(learning_rate(static_cast<long long>(optimizer.step_count())));
  }

  Kind kind() const { return kind_; }                     ///< linear or cosine
  double base_learning_rate() const { return base_lr_; }  ///< the rate the factor multiplies
  long long warmup_steps() const { return warmup_; }      ///< w
  long long training_steps() const { return total_; }     ///< T
  double num_cycles() const { return num_cycles_; }       ///< c (cosine only)

 private:
  LRSchedule(Kind kind, double base_lr, long long warmup, long long total, double cycles);

  Kind kind_;
  double base_lr_;
  long long warmup_, total_;
  double num_cycles_;
};

#if LORA_WITH_BODIES
LORA_FUNC double LRSchedule::factor(long long step) const {
  const double s = static_cast<double>(step);
  if (step < warmup_) return s / static_cast<double>(std::max<long long>(1, warmup_));
  const double rest = static_cast<double>(std::max<long long>(1, total_ - warmup_));
  if (kind_ == Kind::Linear) return std::max(0.0, static_cast<double>(total_ - step) / rest);
  const double progress = (s - static_cast<double>(warmup_)) / rest;
  constexpr double kPi = 3.14159265358979323846;
  return std::max(0.0, 0.5 * (1.0 + std::cos(kPi * num_cycles_ * 2.0 * progress)));
}

LORA_FUNC LRSchedule::LRSchedule(Kind kind, double base_lr, long long warmup, long long total,
                                 double cycles)
    : kind_(kind), base_lr_(base_lr), warmup_(warmup), total_(total), num_cycles_(cycles) {
  constexpr const char* where = "lora::LRSchedule";
  detail::require(std::isfinite(base_lr) && base_lr >= 0, where,
                  ": base_lr must be finite and >= 0, got ", base_lr);
  detail::require(warmup >= 0 && total >= 0, where,
                  ": warmup_steps and training_steps must be >= 0, got ", warmup, " and ", total);
  detail::require(std::isfinite(cycles), where, ": num_cycles must be finite, got ", cycles);
}
#endif

}  // namespace lora
