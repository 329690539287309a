// AdapterStore<T>: thousands of adapters for one frozen model, few of them in memory (S-LoRA's
// adapter pool, vLLM's max_cpu_loras, on a CPU). Adapters are registered by name without being
// read; the first batch that names one loads it; a byte budget bounds what stays resident, the
// least recently used adapter leaving first. Batches on resident adapters keep running while
// another adapter loads (the file is read outside the store's lock), and an adapter in use by a
// batch stays alive until that batch is done, whatever the store evicts or replaces meanwhile.
#pragma once

#include "lora/adapter.hpp"
#include "lora/detail/check.hpp"
#include "lora/detail/segmented_low_rank.hpp"
#include "lora/peft/adapter_io.hpp"
#include "lora/workspace.hpp"

#include <Eigen/Core>

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace lora::peft {

/// A registry of named adapters (PEFT directories, or any source given as a loader) with at most
/// `byte_budget` bytes of them resident, for serving mixed batches on one frozen model. Every
/// member is safe to call from many threads at once.
///
/// Residency: an adapter is loaded on first use (pin or forward_mixed) and stays until the
/// budget needs its room (least recently used first) or evict() drops it. The budget counts the
/// resident adapters' tensors (A, B, their gradients, lora bias, DoRA magnitude); an adapter
/// larger than the whole budget is still loaded for the batch that needs it. A batch holds its
/// adapters (Pins) while it runs: eviction and replace() never free memory a running batch reads;
/// such an adapter's bytes are no longer counted once the store has let it go.
template <typename T>
class AdapterStore {
 public:
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;  ///< a dense T matrix
  using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;               ///< a dense T vector
  using File = AdapterFile<T>;                                      ///< a loaded adapter
  /// Produces an adapter when it is loaded (called outside the store's lock).
  using Loader = std::function<File()>;
  /// Loaded adapters held by a batch, one per distinct id it names (see pin()).
  using Pins = std::vector<std::shared_ptr<const File>>;

  /// A store that keeps at most `byte_budget` bytes of adapters resident; PEFT directories are
  /// read with `options`.
  explicit AdapterStore(std::size_t byte_budget, ReadOptions options = {})
      : budget_(byte_budget), options_(options) {}

  AdapterStore(const AdapterStore&) = delete;             ///< not copyable
  AdapterStore& operator=(const AdapterStore&) = delete;  ///< not copyable

  /// Registers the PEFT adapter directory `dir` as `name` without reading it; returns its id (0,
  /// 1, ... in registration order). Throws std::invalid_argument for an empty or taken name.
  int add(const std::string& name, const std::string& dir) {
    ReadOptions opts = options_;
    return add(name, Loader([dir, opts] { return read_adapter<T>(dir, opts); }));
  }

  /// Registers an adapter produced by `loader` (an adapter built in memory, another file format)
  /// as `name`; returns its id.
  int add(const std::string& name, Loader loader) {
    lora::detail::require(!name.empty(), "AdapterStore::add: the name is empty");
    lora::detail::require(static_cast<bool>(loader), "AdapterStore::add: adapter \"", name,
                          "\" has no loader");
    std::lock_guard<std::mutex> lock(mutex_);
    lora::detail::require(ids_.find(name) == ids_.end(), "AdapterStore::add: an adapter named \"",
                          name, "\" is already registered");
    const int id = static_cast<int>(entries_.size());
    entries_.push_back(std::make_unique<Entry>());
    entries_.back()->name = name;
    entries_.back()->loader = std::move(loader);
    ids_.emplace(name, id);
    return id;
  }

  /// Points adapter `id` at a new source (a hot swap for the whole model): a batch that pins it
  /// after this call returns gets the new adapter, never the old one; batches already running
  /// keep the one they pinned. The resident copy is dropped (and a load in progress discarded).
  void replace(int id, Loader loader) {
    lora::detail::require(static_cast<bool>(loader), "AdapterStore::replace: no loader");
    std::lock_guard<std::mutex> lock(mutex_);
    Entry& e = entry(id, "replace");
    e.loader = std::move(loader);
    ++e.version;
    drop(e);
  }
  /// As above with the PEFT adapter directory `dir`.
  void replace(int id, const std::string& dir) {
    ReadOptions opts = options_;
    replace(id, Loader([dir, opts] { return read_adapter<T>(dir, opts); }));
  }

  /// The id of `name` (std::invalid_argument when none is registered).
  int id(const std::string& name) const {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = ids_.find(name);
    lora::detail::require(it != ids_.end(), "AdapterStore::id: no adapter named \"", name,
                          "\" is registered");
    return it->second;
  }

  /// The name of adapter `id`.
  std::string name(int id) const {
    std::lock_guard<std::mutex> lock(mutex_);
    return entry(id, "name").name;
  }

  /// The number of registered adapters.
  std::size_t size() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return entries_.size();
  }

  /// True while adapter `id` is resident.
  bool resident(int id) const {
    std::lock_guard<std::mutex> lock(mutex_);
    return entry(id, "resident").file != nullptr;
  }
  /// The number of resident adapters.
  std::size_t resident_count() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return resident_count_;
  }
  /// Bytes of the resident adapters (at most the budget, unless one adapter alone exceeds it).
  std::size_t resident_bytes() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return resident_bytes_;
  }
  /// The byte budget.
  std::size_t byte_budget() const { return budget_; }
  /// How many loads have completed (first uses, and reloads after eviction or replacement).
  std::uint64_t loads() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return loads_;
  }

  /// Drops adapter `id`'s resident copy (running batches keep theirs); it loads again when next
  /// used. A no-op when it is not resident.
  void evict(int id) {
    std::lock_guard<std::mutex> lock(mutex_);
    drop(entry(id, "evict"));
  }

  /// Adapter `id`, loading it when it is not resident (other threads' batches go on meanwhile;
  /// a second thread asking for the same adapter waits for that load). Marks it most recently
  /// used. Exceptions of the loader (FormatError, ...) propagate; the adapter then stays
  /// unloaded, and the next use tries again.
  std::shared_ptr<const File> get(int id) {
    std::unique_lock<std::mutex> lock(mutex_);
    Entry& e = entry(id, "get");
    for (;;) {
      if (e.file) {
        e.last_use = ++clock_;
        return e.file;
      }
      if (e.loading) {
        loaded_.wait(lock);
        continue;
      }
      e.loading = true;
      const std::uint64_t version = e.version;
      Loader loader = e.loader;
      lock.unlock();
      std::shared_ptr<const File> file;
      try {
        file = std::make_shared<const File>(loader());
      } catch (...) {
        lock.lock();
        e.loading = false;
        loaded_.notify_all();
        throw;
      }
      lock.lock();
      e.loading = false;
      if (e.version == version) {  // not replaced while loading: keep it
        ++loads_;
        e.file = std::move(file);
        e.bytes = bytes_of(*e.file);
        e.last_use = ++clock_;
        ++resident_count_;
        resident_bytes_ += e.bytes;
        make_room(e);
      }
      loaded_.notify_all();
    }
  }

  /// The adapters a mixed batch names: pins[a] is the a-th distinct id of `ids` (kNoAdapter, -1,
  /// for a column without adapter), and local[j] the position of ids[j] in pins (-1 for none).
  /// Each is loaded as get() does.
  Pins pin(const std::vector<int>& ids, std::vector<int>& local) {
    Pins pins;
    std::vector<int> seen;  // distinct ids, in order of first appearance
    local.assign(ids.size(), -1);
    for (std::size_t j = 0; j < ids.size(); ++j) {
      if (ids[j] < 0) continue;
      std::size_t a = 0;
      while (a < seen.size() && seen[a] != ids[j]) ++a;
      if (a == seen.size()) seen.push_back(ids[j]);
      local[j] = static_cast<int>(a);
    }
    pins.reserve(seen.size());
    for (int id : seen) pins.push_back(get(id));
    return pins;
  }

  /// A mixed batch on one module of the model: column j of X goes through adapter ids[j]'s
  /// adapter of `module` (kNoAdapter, -1, or an adapter without that module: the base alone):
  ///   H_j = W0 X_j + b + s B (A X_j),
  /// with W0 the frozen storage `base` (any frozen storage: dense, bf16, NF4, ...) and b `bias`
  /// (length d, or empty). One W0 X product for the whole batch, one pass per adapter segment
  /// (detail/segmented_low_rank.hpp). Loads what is not resident. Throws std::invalid_argument for
  /// a bad id, a size mismatch or an adapter of another shape; std::invalid_argument for a DoRA
  /// adapter (its magnitude scales the whole weight: serve it through MultiLoRALinear).
  template <typename Frozen>
  void forward_mixed(const Frozen& base, const Eigen::Ref<const Vector>& bias,
                     const std::string& module, const Eigen::Ref<const Matrix>& X,
                     const std::vector<int>& ids, Eigen::Ref<Matrix> H, Workspace<T>& ws) {
    const lora::detail::Where where{"AdapterStore", "forward_mixed"};
    const Eigen::Index d = base.out_features(), k = base.in_features();
    lora::detail::require(X.rows() == k && H.rows() == d && H.cols() == X.cols(), where,
                          ": X must be ", lora::detail::shape_string(k, X.cols()), " and H ",
                          lora::detail::shape_string(d, X.cols()), ", got ",
                          lora::detail::shape_string(X.rows(), X.cols()), " and ",
                          lora::detail::shape_string(H.rows(), H.cols()));
    lora::detail::require(static_cast<Eigen::Index>(ids.size()) == X.cols(), where, ": ", X.cols(),
                          " columns in X but ", ids.size(), " adapter ids");
    lora::detail::require(bias.size() == 0 || bias.size() == d, where, ": bias must have length ",
                          d, " or be empty, got ", bias.size());
    std::vector<int> local;
    const Pins pins = pin(ids, local);
    // The module's adapter of each pinned file (null: that adapter leaves the module alone).
    std::vector<const LoRAAdapter<T>*> of(pins.size(), nullptr);
    for (std::size_t a = 0; a < pins.size(); ++a) {
      const auto it = pins[a]->modules.find(module);
      if (it == pins[a]->modules.end()) continue;
      const LoRAAdapter<T>& ad = it->second;
      lora::detail::require(ad.out_features() == d && ad.in_features() == k, where, ": adapter \"",
                            name(ids[index_of(local, static_cast<int>(a))]), "\" has module \"",
                            module, "\" for a ",
                            lora::detail::shape_string(ad.out_features(), ad.in_features()),
                            " weight, the base is ", lora::detail::shape_string(d, k));
      lora::detail::require(!ad.uses_dora(), where, ": module \"", module,
                            "\" of a DoRA adapter; serve DoRA adapters through MultiLoRALinear");
      of[a] = &ad;
    }
    for (int& l : local)
      if (l >= 0 && of[static_cast<std::size_t>(l)] == nullptr) l = -1;
    lora::detail::assign_segmented_low_rank<T>(
        X, local.data(), static_cast<Eigen::Index>(pins.size()),
        [&](int a) -> const LoRAAdapter<T>& { return *of[static_cast<std::size_t>(a)]; }, bias, H,
        ws);
    base.multiply_add(X, H);  // (d x k)(k x n): one product for the whole batch
  }

  /// The bytes an adapter holds (what the budget counts).
  static std::size_t bytes_of(const File& file) {
    std::size_t n = 0;
    for (const auto& [path, a] : file.modules) {
      (void)path;
      // Each trainable tensor has a gradient of its size.
      n += 2 * static_cast<std::size_t>(a.parameter_count()) * sizeof(T);
    }
    return n;
  }

 private:
  struct Entry {
    std::string name;
    Loader loader;
    std::shared_ptr<const File> file;  // null while not resident
    std::size_t bytes = 0;
    std::uint64_t last_use = 0;
    std::uint64_t version = 0;  // moves on with replace()
    bool loading = false;
  };

  static int index_of(const std::vector<int>& local, int a) {
    for (std::size_t j = 0; j < local.size(); ++j)
      if (local[j] == a) return static_cast<int>(j);
    return 0;
  }

  Entry& entry(int id, const char* method) const {
    lora::detail::require(id >= 0 && static_cast<std::size_t>(id) < entries_.size(),
                          "AdapterStore::", method, ": no adapter with id ", id, " (",
                          entries_.size(), " are registered)");
    return *entries_[static_cast<std::size_t>(id)];
  }

  void drop(Entry& e) {  // under the lock
    if (!e.file) return;
    e.file.reset();
    --resident_count_;
    resident_bytes_ -= e.bytes;
    e.bytes = 0;
  }

  /// Evicts least recently used adapters (never `keep`) until the budget holds. Under the lock;
  /// O(registered) per eviction.
  void make_room(const Entry& keep) {
    while (resident_bytes_ > budget_) {
      Entry* oldest = nullptr;
      for (auto& p : entries_)
        if (p->file && p.get() != &keep && (!oldest || p->last_use < oldest->last_use))
          oldest = p.get();
      if (oldest == nullptr) return;  // `keep` alone exceeds the budget
      drop(*oldest);
    }
  }

  const std::size_t budget_;
  const ReadOptions options_;
  mutable std::mutex mutex_;
  std::condition_variable loaded_;
  std::vector<std::unique_ptr<Entry>> entries_;
  std::unordered_map<std::string, int> ids_;
  std::size_t resident_count_ = 0, resident_bytes_ = 0;
  std::uint64_t clock_ = 0, loads_ = 0;
};

}  // namespace lora::peft
