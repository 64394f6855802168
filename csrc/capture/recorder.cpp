#include "capture/recorder.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <sstream>

#include "capture/digest.h"
#include "capture/errors.h"
#include "capture/executor.h"

namespace genie {

namespace {
std::atomic<int64_t> g_context{0};
}

void set_context(int64_t id) { g_context.store(id, std::memory_order_relaxed); }
int64_t current_context() { return g_context.load(std::memory_order_relaxed); }

// Inference tensors keep no version counter (asking raises); nothing outside inference mode
// can modify them in place, so they count as never modified.
static int64_t version_of(const at::Tensor& t) { return t.is_inference() ? 0 : t._version(); }

TensorRef make_ref(const at::Tensor& t, StorageId id) {
  TensorRef r;
  r.storage = id;
  r.dtype = t.scalar_type();
  r.sizes.assign(t.sizes().begin(), t.sizes().end());
  r.strides.assign(t.strides().begin(), t.strides().end());
  r.offset = t.storage_offset();
  r.storage_nbytes = static_cast<int64_t>(t.storage().nbytes());
  r.device = t.device().type() == c10::DeviceType::PrivateUse1 ? t.device().index() : 0;
  r.requires_grad = t.requires_grad();
  return r;
}

std::string Node::name() const {
  const auto& n = op->operator_name();
  return n.overload_name.empty() ? n.name + ".default" : n.name + "." + n.overload_name;
}

Recorder& recorder() {
  // Leaked on purpose: storages may be released by deleters during interpreter shutdown.
  static auto* r = new Recorder();
  return *r;
}

void Recorder::record(std::shared_ptr<Node> node) {
  std::unique_lock<std::mutex> lock(mutex_);
  node->id = next_node_id_++;
  node->context = current_context();
  if (!empty_producer_.empty()) {
    for (auto s : node->writes) empty_producer_.erase(s);
    for (const auto& in : node->inputs) empty_producer_.erase(in.storage);
  }
  if (node->empty_factory)
    for (auto s : node->fresh) empty_producer_[s] = node;
  ++stats_.nodes_recorded;
  const size_t window = hook_ != nullptr ? hook_->window() : 0;
  if (window_.size() < window) window_.push_back(node);
  pending_.push_back(std::move(node));
  if (window == 0 || window_.size() != window || window_.back() != pending_.back()) return;
  // The window just filled: let the hook guess what is being recorded (outside the lock: it
  // may take the GIL and talk to a server). Note: [Speculation hook]
  auto digest = digest_program(window_, window);
  auto hook = hook_;
  lock.unlock();
  if (digest.ok) hook->on_window(digest.structure_prefix);
}

StorageId Recorder::add_constant(const at::Tensor& cpu, c10::DeviceIndex device, bool snapshot) {
  StorageId id = new_storage_id();
  Constant c;
  c.tensor = snapshot ? cpu.clone() : cpu;
  c.version = version_of(cpu);
  c.device = device;
  std::lock_guard<std::mutex> lock(mutex_);
  constants_.emplace(id, std::move(c));
  pure_constants_.insert(id);
  return id;
}

bool Recorder::replace_empty_with_constant(StorageId storage, const at::Tensor& cpu) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = empty_producer_.find(storage);
  if (it == empty_producer_.end()) return false;
  auto node = it->second;
  empty_producer_.erase(it);
  auto pos = std::find(pending_.begin(), pending_.end(), node);
  if (pos == pending_.end()) return false;
  pending_.erase(pos);
  ++stats_.nodes_dropped;
  Constant c;
  c.tensor = cpu;
  c.version = version_of(cpu);
  c.device = node->outputs.empty() ? 0 : node->outputs[0].device;
  constants_[storage] = std::move(c);
  return true;
}

void Recorder::apply_releases_locked() {
  for (auto id : take_released()) {
    released_.insert(id);
    empty_producer_.erase(id);
  }
}

void Recorder::check_not_poisoned(StorageId id) const {
  std::string message;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = poisoned_.find(id);
    if (it == poisoned_.end()) return;
    message = it->second;
  }
  raise_error(ErrorKind::Execution, message);
}

// Note: [Which nodes a flush runs]
// One reverse pass over the pending program. A node is needed when it writes or creates a
// storage that is needed, or when it reads a storage that a later needed node mutates
// (the "hazard" set): running the later writer first would change what the earlier reader
// sees. A needed node's inputs become needed in turn. With `all`, every storage the user can
// still reach is needed, which is also how dead code is found: what `all` does not need can
// never be observed and is dropped.
namespace {
std::vector<bool> mark_needed(const std::vector<std::shared_ptr<Node>>& nodes,
                              std::unordered_set<StorageId> need,
                              const std::unordered_set<StorageId>* released) {
  std::vector<bool> needed(nodes.size(), false);
  std::unordered_set<StorageId> hazard;
  for (size_t i = nodes.size(); i-- > 0;) {
    const Node& n = *nodes[i];
    bool is_needed = false;
    auto wanted = [&](StorageId s) {
      return need.count(s) || (released != nullptr && !released->count(s));
    };
    for (auto s : n.writes) is_needed = is_needed || wanted(s);
    for (auto s : n.fresh) is_needed = is_needed || wanted(s);
    if (!is_needed) {
      for (const auto& in : n.inputs) {
        if (hazard.count(in.storage)) { is_needed = true; break; }
      }
    }
    if (!is_needed) continue;
    needed[i] = true;
    for (const auto& in : n.inputs) need.insert(in.storage);
    for (auto s : n.writes) hazard.insert(s);
  }
  return needed;
}
}  // namespace

// Note: [Dead outputs]
// A node that runs may still have results nobody can observe: the user's tensor for them died
// before the flush (its storage is in released_) and no node of this flush or of what stays
// pending reads or writes that storage. A composite such as scaled_dot_product_attention drops
// the log-sum-exp and the philox seed and offset of the kernel it calls at once. Such outputs
// become undefined (kUndefinedOutput) before any executor sees the nodes: the kernel still
// runs for its other results, but nothing binds, keeps or moves the dead ones, and their ids
// are never resident anywhere, so no release is sent for them either. This matters on a GPU:
// CUDA's memory-efficient attention returns its seed and offset as host tensors, and binding
// them meant two host-to-device copies per attention call.
void Recorder::drop_dead_outputs(FlushRequest& req, const std::vector<std::shared_ptr<Node>>& remaining) {
  if (released_.empty()) return;
  std::unordered_set<StorageId> touched(req.targets.begin(), req.targets.end());
  if (req.then_fetch) touched.insert(req.then_fetch->storage);
  auto touch = [&](const std::vector<std::shared_ptr<Node>>& nodes) {
    for (const auto& n : nodes) {
      for (const auto& in : n->inputs) touched.insert(in.storage);
      for (auto s : n->writes) touched.insert(s);
    }
  };
  touch(req.nodes);
  touch(remaining);
  for (auto& n : req.nodes) {
    if (n->eager) continue;  // ran at capture: its results are bound already
    for (size_t i = 0; i < n->outputs.size(); ++i) {
      if (n->output_alias[i] != -1) continue;
      StorageId s = n->outputs[i].storage;
      if (!released_.count(s) || touched.count(s)) continue;
      auto fresh = std::find(n->fresh.begin(), n->fresh.end(), s);
      if (fresh == n->fresh.end()) continue;
      // Another output of the same node may view this storage (its fresh entry is shared).
      bool shared = false;
      for (size_t j = 0; j < n->outputs.size(); ++j)
        shared = shared || (j != i && n->output_alias[j] != kUndefinedOutput && n->outputs[j].storage == s);
      if (shared) continue;
      n->fresh.erase(fresh);
      n->outputs[i] = TensorRef();
      n->output_alias[i] = kUndefinedOutput;
      released_.erase(s);
      poisoned_.erase(s);
    }
  }
}

void Recorder::collect() { flush({}); }

void Recorder::flush(const std::vector<StorageId>& targets, std::optional<TensorRef> then_fetch,
                     bool keep_targets) {
  std::string error;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    error = flush_locked(targets, /*all=*/false, std::move(then_fetch), keep_targets);
  }
  if (!error.empty()) raise_error(ErrorKind::Execution, error);
}

void Recorder::flush_all() {
  std::string error;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    error = flush_locked({}, /*all=*/true);
  }
  if (!error.empty()) raise_error(ErrorKind::Execution, error);
}

std::string Recorder::flush_locked(const std::vector<StorageId>& targets, bool all,
                                   std::optional<TensorRef> then_fetch, bool keep_targets) {
  TORCH_CHECK(executor_ != nullptr, "genie: no executor is configured");
  apply_releases_locked();

  // 1. Dead code: what no reachable storage depends on is dropped without running.
  {
    auto live = mark_needed(pending_, {targets.begin(), targets.end()}, &released_);
    std::vector<std::shared_ptr<Node>> kept;
    kept.reserve(pending_.size());
    for (size_t i = 0; i < pending_.size(); ++i) {
      if (live[i]) kept.push_back(std::move(pending_[i]));
      else ++stats_.nodes_dropped;
    }
    pending_.swap(kept);
  }

  // 2. What this flush must run.
  std::vector<bool> needed;
  if (all) {
    needed.assign(pending_.size(), true);
  } else {
    needed = mark_needed(pending_, {targets.begin(), targets.end()}, nullptr);
  }
  FlushRequest req;
  req.targets = targets;
  req.then_fetch = std::move(then_fetch);
  std::vector<std::shared_ptr<Node>> remaining;
  for (size_t i = 0; i < pending_.size(); ++i) {
    if (needed[i]) req.nodes.push_back(pending_[i]);
    else remaining.push_back(pending_[i]);
  }
  drop_dead_outputs(req, remaining);
  std::unordered_set<StorageId> wanted_constants(targets.begin(), targets.end());
  for (const auto& n : req.nodes)
    for (const auto& in : n->inputs) wanted_constants.insert(in.storage);
  for (auto id : wanted_constants) {
    auto it = constants_.find(id);
    if (it == constants_.end() || !pure_constants_.count(id)) continue;
    if (version_of(it->second.tensor) != it->second.version) {
      // The recorded program would read a value that no longer exists. What depends on it
      // fails (now and whenever it is asked for again); everything else carries on.
      std::string msg =
          "genie: a CPU tensor of shape " + c10::str(it->second.tensor.sizes()) +
          " used by pending remote_accelerator work was modified in place before the work ran; "
          "clone it (or move it to the device) before modifying it";
      for (const auto& n : req.nodes) {
        for (auto s : n->writes) poisoned_[s] = msg;
        for (auto s : n->fresh) poisoned_[s] = msg;
      }
      pending_.swap(remaining);
      return msg;
    }
  }
  for (auto id : wanted_constants) {
    auto it = constants_.find(id);
    if (it == constants_.end()) continue;
    req.constants.emplace(id, std::move(it->second));
    constants_.erase(it);
  }

  std::unordered_set<StorageId> mentioned;
  if (keep_targets) mentioned.insert(targets.begin(), targets.end());
  for (const auto& n : remaining) {
    for (const auto& in : n->inputs) mentioned.insert(in.storage);
    for (auto s : n->writes) mentioned.insert(s);
    for (auto s : n->fresh) mentioned.insert(s);
  }
  // Uploads nothing pending reads any more: pure constants go; a live remote storage's upload
  // stays (later work may read that storage).
  for (auto it = constants_.begin(); it != constants_.end();) {
    bool pure = pure_constants_.count(it->first) > 0;
    if (!mentioned.count(it->first) && (pure || released_.count(it->first))) {
      it = constants_.erase(it);
    } else {
      mentioned.insert(it->first);
      ++it;
    }
  }

  // Note: [Dead after the flush]
  // Only the recorder knows which storages a live tensor still holds. What this flush leaves
  // unreachable -- released storages and uploads no pending node mentions -- it releases right
  // after the flush; the request names them first, so an executor that runs the flush in
  // pieces (a plan over several servers) may free each one as soon as its last reader in the
  // flush ran instead of holding it to the end (Note: [What a device holds] in
  // python/genie/scheduler/memory.py).
  for (auto id : released_)
    if (!mentioned.count(id)) req.dead.push_back(id);
  for (auto id : pure_constants_)
    if (!mentioned.count(id)) req.dead.push_back(id);
  std::sort(req.dead.begin(), req.dead.end());
  req.dead.erase(std::unique(req.dead.begin(), req.dead.end()), req.dead.end());

  if (!req.nodes.empty() || !req.constants.empty()) {
    try {
      executor_->run(req);
    } catch (const std::exception& e) {
      std::string msg = e.what();
      for (const auto& n : req.nodes) {
        for (auto s : n->writes) poisoned_[s] = msg;
        for (auto s : n->fresh) poisoned_[s] = msg;
      }
      pending_.swap(remaining);
      last_flushed_ = req.nodes;
      throw;
    }
    stats_.nodes_executed += static_cast<int64_t>(req.nodes.size());
    if (!req.nodes.empty()) window_.clear();
    stats_.constants_uploaded += static_cast<int64_t>(req.constants.size());
    ++stats_.flushes;
  }
  last_flushed_ = std::move(req.nodes);
  pending_.swap(remaining);

  // 3. Free what nobody can reach (the request's `dead`): released storages no pending node
  //    mentions, and pure constants (CPU inputs) once no pending node reads them.
  for (auto id : req.dead) {
    if (released_.erase(id)) poisoned_.erase(id);
    pure_constants_.erase(id);
  }
  if (!req.dead.empty()) executor_->release(req.dead);
  return {};
}

std::vector<std::shared_ptr<Node>> Recorder::pending() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return pending_;
}

std::unordered_map<StorageId, Constant> Recorder::pending_constants() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return constants_;
}

std::vector<std::shared_ptr<Node>> Recorder::last_flushed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return last_flushed_;
}

RecorderStats Recorder::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

size_t Recorder::pending_count() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return pending_.size();
}

void Recorder::set_executor(std::shared_ptr<Executor> executor) {
  std::lock_guard<std::mutex> lock(mutex_);
  executor_ = std::move(executor);
  hook_.reset();
  window_.clear();
}

void Recorder::set_speculation_hook(std::shared_ptr<SpeculationHook> hook) {
  std::lock_guard<std::mutex> lock(mutex_);
  hook_ = std::move(hook);
  window_.clear();
}

std::shared_ptr<Executor> Recorder::executor() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return executor_;
}

}  // namespace genie
