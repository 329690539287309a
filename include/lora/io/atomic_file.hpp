// Atomic file replacement: the new contents go to a temporary file in the target's folder, which
// is flushed to disk (fsync) and then renamed over the target. rename() within one file system is
// atomic on POSIX, so a reader sees either the whole old file or the whole new one, and a failure
// at any step (a full disk, an unwritable folder, a crash) leaves the previous file untouched.
#pragma once

#include "lora/detail/compiled_mode.hpp"

#if LORA_WITH_BODIES
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace lora::io {

/// Writing a file failed; the previous file at that path (if any) is left as it was.
class WriteError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

/// A step of write_file_atomically at which a test can inject a failure.
enum class WriteStep { None, Open, Write, Sync, Rename };

/// Test hook: the step that fails artificially, once, in the current thread's next
/// write_file_atomically call (WriteStep::None: none). Set it to check that a failed save leaves
/// the previous file byte-identical.
inline thread_local WriteStep injected_write_failure = WriteStep::None;
/// Test hook: how many write_file_atomically calls succeed before the injected failure strikes
/// (so that the second file of a two-file save can be made to fail).
inline thread_local int injected_write_failure_skip = 0;

/// The failure to inject into this call (consumes one skip).
LORA_FUNC WriteStep take_injected_failure();

LORA_FUNC std::string errno_string(int err);

LORA_FUNC std::string folder_of(const std::string& path);

/// A new name in the folder of `target`: `<target's name>.<tag>.<pid>.<n>`, with the target's
/// name cut short where the whole would pass the file system's name limit (NAME_MAX, 255 bytes on
/// most), so that any valid target has one.
LORA_FUNC std::string sibling_name(const std::string& target, const char* tag);

/// Closes and removes the temporary file unless released (the rename succeeded).
class TempFile {
 public:
  TempFile() = default;
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  ~TempFile();

  /// Creates a fresh file beside `target` (O_EXCL: never reuses an existing name); see
  /// sibling_name.
  void create(const std::string& target);

  int fd() const { return fd_; }
  const std::string& path() const { return path_; }

  /// Closes the descriptor, reporting a failed close (a late write error on some file systems).
  void close_checked(const std::string& target);

  void release() { path_.clear(); }

 private:
  int fd_ = -1;
  std::string path_;
};

LORA_FUNC void fail_if_injected(WriteStep injected, WriteStep step, const std::string& target,
                                const char* what);

#if LORA_WITH_BODIES

LORA_FUNC WriteStep take_injected_failure() {
  if (injected_write_failure == WriteStep::None) return WriteStep::None;
  if (injected_write_failure_skip > 0) {
    --injected_write_failure_skip;
    return WriteStep::None;
  }
  const WriteStep step = injected_write_failure;
  injected_write_failure = WriteStep::None;  // one shot: a retry or a rollback then succeeds
  return step;
}

LORA_FUNC std::string errno_string(int err) {
  return std::string(std::strerror(err));
}

LORA_FUNC std::string folder_of(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

LORA_FUNC std::string sibling_name(const std::string& target, const char* tag) {
  static std::atomic<unsigned> counter{0};
  const auto slash = target.find_last_of('/');
  const std::string name = slash == std::string::npos ? target : target.substr(slash + 1);
  const long limit = ::pathconf(folder_of(target).c_str(), _PC_NAME_MAX);
  const std::size_t name_max = limit > 0 ? static_cast<std::size_t>(limit) : 255;
  const std::string suffix = std::string(".") + tag + "." + std::to_string(::getpid()) + "." +
                             std::to_string(counter.fetch_add(1));
  const std::size_t keep = name_max > suffix.size() ? name_max - suffix.size() : 0;
  const std::string base = name.substr(0, std::min(name.size(), keep)) + suffix;
  return slash == std::string::npos ? base : target.substr(0, slash + 1) + base;
}

LORA_FUNC TempFile::~TempFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!path_.empty()) ::unlink(path_.c_str());
}

LORA_FUNC void TempFile::create(const std::string& target) {
  for (int attempt = 0; attempt < 100; ++attempt) {
    const std::string candidate = sibling_name(target, "tmp");
    const int fd = ::open(candidate.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd >= 0) {
      fd_ = fd;
      path_ = candidate;
      return;
    }
    if (errno != EEXIST) {
      throw WriteError("cannot create a temporary file beside \"" + target +
                       "\": " + errno_string(errno));
    }
  }
  throw WriteError("cannot create a temporary file beside \"" + target + "\": names exhausted");
}

LORA_FUNC void TempFile::close_checked(const std::string& target) {
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0)
    throw WriteError("closing the temporary file for \"" + target +
                     "\" failed: " + errno_string(errno));
}

LORA_FUNC void fail_if_injected(WriteStep injected, WriteStep step, const std::string& target,
                                const char* what) {
  if (injected == step)
    throw WriteError(std::string(what) + " for \"" + target + "\" failed: injected test failure");
}

#endif  // LORA_WITH_BODIES

}  // namespace detail

/// Replaces the file at `path` with `size` bytes from `data`, atomically: a temporary file in the
/// same folder is written, fsync'ed, and renamed over `path` (then the folder is fsync'ed so the
/// rename itself is durable). Throws WriteError on any failure, after removing the temporary file;
/// the previous file at `path`, if any, is then unchanged.
LORA_FUNC void write_file_atomically(const std::string& path, const void* data, std::size_t size);

/// As above for the characters of a string.
LORA_FUNC void write_file_atomically(const std::string& path, const std::string& contents);

#if LORA_WITH_BODIES

LORA_FUNC void write_file_atomically(const std::string& path, const void* data, std::size_t size) {
  using detail::WriteStep;
  if (path.empty()) throw WriteError("write_file_atomically: the path is empty");
  const WriteStep inject = detail::take_injected_failure();
  detail::fail_if_injected(inject, WriteStep::Open, path, "creating the temporary file");
  detail::TempFile tmp;
  tmp.create(path);

  // An injected write failure stops after half of the bytes, leaving a partial temporary file.
  const std::size_t to_write = inject == WriteStep::Write ? size / 2 : size;
  const auto* p = static_cast<const std::uint8_t*>(data);
  std::size_t left = to_write;
  while (left > 0) {
    const ssize_t n = ::write(tmp.fd(), p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw WriteError("writing the temporary file for \"" + path +
                       "\" failed: " + detail::errno_string(errno));
    }
    p += n;
    left -= static_cast<std::size_t>(n);
  }
  detail::fail_if_injected(inject, WriteStep::Write, path, "writing the temporary file");

  detail::fail_if_injected(inject, WriteStep::Sync, path, "fsync of the temporary file");
  if (::fsync(tmp.fd()) != 0)
    throw WriteError("fsync of the temporary file for \"" + path +
                     "\" failed: " + detail::errno_string(errno));
  tmp.close_checked(path);

  detail::fail_if_injected(inject, WriteStep::Rename, path, "renaming the temporary file");
  if (::rename(tmp.path().c_str(), path.c_str()) != 0)
    throw WriteError("renaming the temporary file over \"" + path +
                     "\" failed: " + detail::errno_string(errno));
  tmp.release();

  // Make the rename durable. Best effort: some file systems refuse fsync on a folder, and the
  // new file is complete either way.
  const int dir = ::open(detail::folder_of(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir >= 0) {
    (void)::fsync(dir);
    ::close(dir);
  }
}

LORA_FUNC void write_file_atomically(const std::string& path, const std::string& contents) {
  write_file_atomically(path, contents.data(), contents.size());
}

#endif  // LORA_WITH_BODIES

}  // namespace lora::io
