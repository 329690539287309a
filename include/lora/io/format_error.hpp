// lora::io::FormatError: the one exception type by which every reader refuses a file.
#pragma once

#include <stdexcept>

namespace lora::io {

/// A file that is not a valid safetensors file or adapter, or does not hold what the caller asked
/// for (also: a path that cannot be read, or that names a directory instead of a file).
class FormatError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace lora::io
