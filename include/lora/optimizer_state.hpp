// Optimizer state in a safetensors file beside the adapter, so that a training run can stop and
// resume bit for bit: AdamW's m and v (torch's exp_avg, exp_avg_sq) and step count, or SGD's
// momentum buffers and step count. Tensors are named as torch's optimizer.state_dict() keys them,
// by parameter index:
//   state.<i>.exp_avg, state.<i>.exp_avg_sq      (AdamW)      state.<i>.momentum_buffer   (SGD)
// in the optimizer's scalar type (F32 or F64: no rounding), with "__metadata__" holding the
// optimizer's name, the step count and each parameter's name (state.<i>.name). The options
// (learning rate, betas, ...) are not stored: build the resumed optimizer with the same options
// (an LRSchedule sets the learning rate from the restored step count). Link lora::peft.
#pragma once

#include "lora/detail/check.hpp"
#include "lora/detail/compiled_mode.hpp"
#include "lora/io/format_error.hpp"
#include "lora/io/safetensors.hpp"
#include "lora/io/safetensors_writer.hpp"
#include "lora/optim.hpp"

#include <Eigen/Core>

#include <cstddef>
#include <string>
#include <type_traits>
#include <vector>

namespace lora {

namespace detail {

template <typename T>
io::DType optimizer_dtype() {
  return std::is_same_v<T, float> ? io::DType::F32 : io::DType::F64;
}

LORA_FUNC std::string state_key(std::size_t i, const char* what);

/// Starts a writer with the metadata shared by every optimizer.
template <typename T>
io::SafeTensorsWriter state_writer(const char* optimizer, long long steps,
                                   const std::vector<ParameterView<T>>& params) {
  io::SafeTensorsWriter w;
  w.set_metadata("optimizer", optimizer);
  w.set_metadata("step", std::to_string(steps));
  w.set_metadata("parameters", std::to_string(params.size()));
  for (std::size_t i = 0; i < params.size(); ++i)
    w.set_metadata(state_key(i, "name"), params[i].name);
  return w;
}

/// Checks the file is `optimizer`'s state for `params` (count and names); returns its step count.
template <typename T>
long long check_state_file(const io::SafeTensors& st, const std::string& path,
                           const char* optimizer, const std::vector<ParameterView<T>>& params) {
  const auto& meta = st.metadata();
  const auto get = [&](const std::string& key) -> std::string {
    const auto it = meta.find(key);
    if (it == meta.end())
      throw io::FormatError("load_optimizer_state: \"" + path + "\" has no metadata \"" + key +
                            "\"; it is not an optimizer state written by save_optimizer_state");
    return it->second;
  };
  const std::string kind = get("optimizer");
  if (kind != optimizer)
    throw io::FormatError("load_optimizer_state: \"" + path + "\" holds the state of " + kind +
                          ", not of " + optimizer);
  const std::string count = get("parameters");
  if (count != std::to_string(params.size()))
    throw std::invalid_argument("load_optimizer_state: \"" + path + "\" holds the state of " +
                                count + " parameters, the optimizer has " +
                                std::to_string(params.size()));
  for (std::size_t i = 0; i < params.size(); ++i) {
    const std::string name = get(state_key(i, "name"));
    if (name != params[i].name)
      throw std::invalid_argument("load_optimizer_state: parameter " + std::to_string(i) +
                                  " of \"" + path + "\" is \"" + name +
                                  "\", the optimizer's is \"" + params[i].name +
                                  "\" (the parameters must be given in the saved order)");
  }
  const std::string step = get("step");
  std::size_t used = 0;
  long long steps = -1;
  try {
    steps = std::stoll(step, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != step.size() || steps < 0)
    throw io::FormatError("load_optimizer_state: \"" + path + "\": step \"" + step +
                          "\" is not a count");
  return steps;
}

template <typename T>
Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> state_tensor(const io::SafeTensors& st,
                                                              const std::string& path,
                                                              const std::string& key) {
  if (!st.contains(key))
    throw io::FormatError("load_optimizer_state: \"" + path + "\" has no tensor \"" + key + "\"");
  if (st.info(key).dtype != optimizer_dtype<T>())
    throw io::FormatError("load_optimizer_state: tensor \"" + key + "\" of \"" + path + "\" is " +
                          io::dtype_name(st.info(key).dtype) + ", the optimizer's state is " +
                          io::dtype_name(optimizer_dtype<T>()));
  return st.matrix<T>(key);
}

#if LORA_WITH_BODIES

LORA_FUNC std::string state_key(std::size_t i, const char* what) {
  return "state." + std::to_string(i) + "." + what;
}

#endif  // LORA_WITH_BODIES

}  // namespace detail

/// Writes AdamW's state (step count, m and v of each parameter) to the safetensors file `path`,
/// replaced atomically; see the top of this file. Throws std::runtime_error when the file cannot
/// be written.
template <typename T>
void save_optimizer_state(const std::string& path, const AdamW<T>& optimizer) {
  const auto& params = optimizer.parameters();
  auto w = detail::state_writer<T>("AdamW", optimizer.step_count(), params);
  for (std::size_t i = 0; i < params.size(); ++i) {
    w.add(detail::state_key(i, "exp_avg"), optimizer.first_moment(i), detail::optimizer_dtype<T>());
    w.add(detail::state_key(i, "exp_avg_sq"), optimizer.second_moment(i),
          detail::optimizer_dtype<T>());
  }
  w.save(path);
}

/// Writes SGD's state (step count and, with momentum, the momentum buffers) to `path`.
template <typename T>
void save_optimizer_state(const std::string& path, const SGD<T>& optimizer) {
  const auto& params = optimizer.parameters();
  auto w = detail::state_writer<T>("SGD", optimizer.step_count(), params);
  if (optimizer.options().momentum > 0)
    for (std::size_t i = 0; i < params.size(); ++i)
      w.add(detail::state_key(i, "momentum_buffer"), optimizer.momentum_buffer(i),
            detail::optimizer_dtype<T>());
  w.save(path);
}

/// Restores into `optimizer` (built over the same parameters, in the same order, with the same
/// options) the AdamW state save_optimizer_state wrote to `path`: its next step() is the one the
/// saved run would have taken. Throws io::FormatError for a file that is not such a state (or of
/// another optimizer or scalar type), std::invalid_argument when the parameters differ (count,
/// names, shapes); the optimizer is unchanged then.
template <typename T>
void load_optimizer_state(const std::string& path, AdamW<T>& optimizer) {
  const io::SafeTensors st = io::SafeTensors::load(path);
  const auto& params = optimizer.parameters();
  const long long steps = detail::check_state_file(st, path, "AdamW", params);
  using Matrix = typename AdamW<T>::Matrix;
  std::vector<Matrix> m, v;
  for (std::size_t i = 0; i < params.size(); ++i) {
    m.push_back(detail::state_tensor<T>(st, path, detail::state_key(i, "exp_avg")));
    v.push_back(detail::state_tensor<T>(st, path, detail::state_key(i, "exp_avg_sq")));
  }
  optimizer.load_state(steps, m, v);
}

/// Restores SGD's state from `path`, as the AdamW overload.
template <typename T>
void load_optimizer_state(const std::string& path, SGD<T>& optimizer) {
  const io::SafeTensors st = io::SafeTensors::load(path);
  const auto& params = optimizer.parameters();
  const long long steps = detail::check_state_file(st, path, "SGD", params);
  std::vector<typename SGD<T>::Matrix> momentum;
  if (optimizer.options().momentum > 0)
    for (std::size_t i = 0; i < params.size(); ++i)
      momentum.push_back(
          detail::state_tensor<T>(st, path, detail::state_key(i, "momentum_buffer")));
  optimizer.load_state(steps, momentum);
}

}  // namespace lora
