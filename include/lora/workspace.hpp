// Workspace<T>: scratch memory that a training loop owns and passes to the out-parameter calls, so
// that a step allocates nothing once the buffers have grown to the largest batch seen.
#pragma once

#include <Eigen/Core>

namespace lora {

template <typename T>
class Workspace {
 public:
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  using View = Eigen::Map<Matrix>;

  /// A rows x cols scratch matrix; slot 0..kSlots-1 are independent buffers. The storage grows
  /// when a larger view is asked for and is never shrunk, so steady-state calls do not allocate.
  View get(int slot, Eigen::Index rows, Eigen::Index cols) {
    Buffer& b = slots_[slot];
    if (b.size() < rows * cols) b.resize(rows * cols);
    return View(b.data(), rows, cols);
  }

  static constexpr int kSlots = 4;

 private:
  using Buffer = Eigen::Matrix<T, Eigen::Dynamic, 1>;
  Buffer slots_[kSlots];
};

}  // namespace lora
