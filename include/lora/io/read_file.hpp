// Reading a whole file with POSIX calls, so that every failure is a lora::io::FormatError: an
// std::ifstream opened on a directory succeeds and then throws std::ios_base::failure
// ("basic_filebuf::underflow error") from the first read, a type no caller expects.
#pragma once

#include "lora/io/format_error.hpp"

#include "lora/detail/compiled_mode.hpp"

#if LORA_WITH_BODIES
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace lora::io {

/// The bytes of the regular file at `path`. Throws FormatError, prefixed with `what` (e.g.
/// "safetensors"), when the path cannot be opened, is not a regular file (a directory, a FIFO, a
/// device), is larger than `max_bytes`, or a read fails.
LORA_FUNC std::vector<std::uint8_t> read_file(
    const std::string& path, const std::string& what,
    std::uint64_t max_bytes = std::numeric_limits<std::uint64_t>::max());

#if LORA_WITH_BODIES

LORA_FUNC std::vector<std::uint8_t> read_file(const std::string& path, const std::string& what,
                                              std::uint64_t max_bytes) {
  auto fail = [&](const std::string& why) {
    return FormatError(what + ": cannot read \"" + path + "\": " + why);
  };
  // O_NONBLOCK: opening a FIFO without a writer must not hang; it is then refused as not regular.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0)
    throw FormatError(what + ": cannot open \"" + path + "\" for reading: " + std::strerror(errno));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw fail(std::strerror(errno));
  if (S_ISDIR(st.st_mode)) throw fail("it is a directory, not a file");
  if (!S_ISREG(st.st_mode)) throw fail("it is not a regular file");
  const auto size = static_cast<std::uint64_t>(st.st_size);
  if (size > max_bytes)
    throw fail("it is " + std::to_string(size) + " bytes, more than the limit of " +
               std::to_string(max_bytes));
  std::vector<std::uint8_t> bytes(static_cast<std::size_t>(size));
  std::size_t got = 0;
  for (;;) {
    if (got == bytes.size()) {  // the file may have grown since fstat: look for more
      if (bytes.size() >= max_bytes) {
        std::uint8_t probe;
        const ssize_t n = ::read(fd, &probe, 1);
        if (n > 0) throw fail("it grew past the limit of " + std::to_string(max_bytes) + " bytes");
        if (n == 0) break;
        if (errno == EINTR) continue;
        throw fail(std::strerror(errno));
      }
      bytes.resize(std::min<std::uint64_t>(max_bytes, bytes.size() * 2 + 4096));
    }
    const ssize_t n = ::read(fd, bytes.data() + got, bytes.size() - got);
    if (n == 0) break;
    if (n < 0) {
      if (errno == EINTR) continue;
      throw fail(std::strerror(errno));
    }
    got += static_cast<std::size_t>(n);
  }
  bytes.resize(got);
  return bytes;
}

#endif  // LORA_WITH_BODIES

}  // namespace lora::io
