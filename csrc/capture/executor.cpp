#include "capture/executor.h"

#include "capture/errors.h"
#include "capture/stack.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/TensorImpl.h>


namespace genie {

at::Tensor view_of(const c10::Storage& storage, c10::Device device, c10::ScalarType dtype,
                   c10::IntArrayRef sizes, c10::IntArrayRef strides, int64_t offset) {
  const size_t needed = at::detail::computeStorageNbytes(sizes, strides, c10::elementSize(dtype), offset);
  if (needed > storage.nbytes() || (needed > 0 && storage.data() == nullptr))
    raise_error(ErrorKind::Execution, "genie: a " + std::string(c10::toString(dtype)) + c10::str(sizes) +
                                          " view needs " + std::to_string(needed) + " bytes of a storage that holds " +
                                          std::to_string(storage.nbytes()) + " (Note: [Checked results])");
  auto key = c10::computeDispatchKey(std::nullopt, c10::kStrided, device);
  auto t = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(storage), c10::DispatchKeySet(key),
                                                    c10::scalarTypeToTypeMeta(dtype));
  t.unsafeGetTensorImpl()->set_sizes_and_strides(sizes, strides, offset);
  return t;
}

namespace {

// A whole storage moved to `device`, byte for byte, so recorded geometries stay valid.
c10::Storage storage_to(const at::Tensor& t, c10::Device device) {
  const auto& st = t.storage();
  if (t.device() == device) return st;
  auto nbytes = static_cast<int64_t>(st.nbytes());
  auto bytes = view_of(st, t.device(), at::kByte, {nbytes}, {1}, 0);
  return bytes.to(device).storage();
}

bool is_generator_slot(const c10::Argument& a) {
  auto k = a.type()->kind();
  if (k == c10::TypeKind::GeneratorType) return true;
  return k == c10::TypeKind::OptionalType &&
         a.type()->castRaw<c10::OptionalType>()->getElementType()->kind() == c10::TypeKind::GeneratorType;
}

std::string dtype_name(c10::ScalarType t) {
  switch (t) {
    case at::kFloat: return "f32";
    case at::kDouble: return "f64";
    case at::kHalf: return "f16";
    case at::kBFloat16: return "bf16";
    case at::kLong: return "i64";
    case at::kInt: return "i32";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

}  // namespace

// Plain string building: this runs inside error paths, where it must not depend on iostream
// state (an ostringstream here crashed on one toolchain's libstdc++ inside a catch block).
std::string describe_inputs(const Node& node) {
  std::string out = "[";
  for (size_t i = 0; i < node.inputs.size(); ++i) {
    if (i) out += ", ";
    out += dtype_name(node.inputs[i].dtype);
    out += "[";
    for (size_t d = 0; d < node.inputs[i].sizes.size(); ++d) {
      if (d) out += ", ";
      out += std::to_string(node.inputs[i].sizes[d]);
    }
    out += "]";
  }
  return out + "]";
}

namespace {
std::string describe_geometry(c10::ScalarType dtype, c10::IntArrayRef sizes) {
  std::string out = dtype_name(dtype) + "[";
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (d) out += ", ";
    out += std::to_string(sizes[d]);
  }
  return out + "]";
}
}  // namespace

// The same elements in the same order: sizes equal but for dims of size 1 (a meta kernel that
// says [1] where the kernel returns a 0-dim tensor, as multilabel_margin_loss's does).
static bool same_but_unit_dims(c10::IntArrayRef a, c10::IntArrayRef b) {
  if (a == b) return true;
  size_t i = 0, j = 0;
  while (true) {
    while (i < a.size() && a[i] == 1) ++i;
    while (j < b.size() && b[j] == 1) ++j;
    if (i == a.size() || j == b.size()) return i == a.size() && j == b.size();
    if (a[i++] != b[j++]) return false;
  }
}

std::string result_mismatch(const Node& node, size_t k, const at::Tensor& value, const c10::Device& device) {
  const TensorRef& ref = node.outputs[k];
  const std::string head = "genie: " + node.name() + " on " + device.str() + " returned ";
  const std::string tail = " for its output " + std::to_string(k) + ", where capture recorded " +
                           describe_geometry(ref.dtype, ref.sizes) +
                           " (its meta kernel and this kernel disagree); that output cannot be read";
  if (!value.defined()) return head + "no tensor" + tail;
  if (value.scalar_type() != ref.dtype || !same_but_unit_dims(value.sizes(), ref.sizes))
    return head + describe_geometry(value.scalar_type(), value.sizes()) + tail;
  return {};
}

std::string result_count_mismatch(const Node& node, size_t got, const c10::Device& device) {
  return "genie: " + node.name() + " on " + device.str() + " returned " + std::to_string(got) +
         " tensors where capture recorded " + std::to_string(node.outputs.size()) +
         " (its meta kernel and this kernel disagree); its results cannot be read";
}

LocalExecutor::LocalExecutor(c10::Device device) : device_(device) {}

std::string LocalExecutor::name() const { return "local:" + device_.str(); }

at::Tensor LocalExecutor::materialize_locked(const TensorRef& ref) {
  auto it = env_.find(ref.storage);
  if (it == env_.end()) {
    auto broken = broken_.find(ref.storage);
    if (broken != broken_.end()) raise_error(ErrorKind::Execution, broken->second.why);
    raise_error(ErrorKind::Execution, "genie: storage " + std::to_string(ref.storage) + " is not resident on executor " +
                                          name() + " (it was never produced, or it was released)");
  }
  return view_of(it->second, device_, ref.dtype, ref.sizes, ref.strides, ref.offset);
}

at::Tensor LocalExecutor::materialize(const TensorRef& ref) {
  std::lock_guard<std::mutex> lock(mutex_);
  return materialize_locked(ref);
}

c10::Storage storage_for(const TensorRef& ref, const at::Tensor& value, c10::Device device) {
  // A result returned as a conjugate or negative view (linalg_lu_solve's adjoint path): its
  // storage holds the values without the bit, so bind the resolved values instead (Note:
  // [Conjugate and negative views] in kernels.cpp).
  if (value.is_conj() || value.is_neg()) return storage_for(ref, value.resolve_conj().resolve_neg(), device);
  // An efficient zero tensor (autograd's zeros, e.g. sgn's gradient) has a storage with no
  // memory behind it: bind real zeros.
  if (value._is_zerotensor()) return storage_for(ref, at::zeros(value.sizes(), value.options().device(device)), device);
  if (value.device() == device && value.sizes() == c10::IntArrayRef(ref.sizes) &&
      value.strides() == c10::IntArrayRef(ref.strides) && value.storage_offset() == ref.offset &&
      value.scalar_type() == ref.dtype)
    return value.storage();
  if (value.sizes() != c10::IntArrayRef(ref.sizes) && value.scalar_type() == ref.dtype &&
      same_but_unit_dims(value.sizes(), ref.sizes))
    return storage_for(ref, value.reshape(ref.sizes), device);
  if (value.sizes() != c10::IntArrayRef(ref.sizes) || value.scalar_type() != ref.dtype)
    raise_error(ErrorKind::Execution, "genie: a " + describe_geometry(value.scalar_type(), value.sizes()) +
                                          " result cannot stand for a recorded " +
                                          describe_geometry(ref.dtype, ref.sizes) + " (Note: [Checked results])");
  // The kernel chose another layout than meta inference did: keep the recorded one, since
  // later ops address this storage by the recorded geometry.
  int64_t nbytes = std::max<int64_t>(ref.storage_nbytes, 1);
  auto bytes = at::empty({nbytes}, at::TensorOptions().dtype(at::kByte).device(device));
  auto dst = view_of(bytes.storage(), device, ref.dtype, ref.sizes, ref.strides, ref.offset);
  dst.copy_(value);
  return bytes.storage();
}

void LocalExecutor::bind_locked(const TensorRef& ref, const at::Tensor& value) {
  env_[ref.storage] = storage_for(ref, value, device_);
  if (!broken_.empty()) broken_.erase(ref.storage);
}

void LocalExecutor::bind(const TensorRef& ref, const at::Tensor& value) {
  std::lock_guard<std::mutex> lock(mutex_);
  bind_locked(ref, value);
}

// Note: [Replaying on the host]
// Random ops replay on the CPU with their recorded generator state (see Note: [Backend RNG]),
// whatever the executor's device; their tensors go to the host and come back.
// Note: [Host fallback]
// An op with no kernel for the executor's device (a CPU-only op on a CUDA executor) runs on
// the host instead, with a warning naming it, and its results are copied back: an explicit,
// logged fallback rather than a failure.
namespace {

std::vector<c10::IValue> call_on(const Node& node, c10::Device device, const Materialize& materialize,
                                 bool host) {
  const c10::Device run_on = host ? c10::Device(c10::DeviceType::CPU) : device;
  std::vector<at::Tensor> real(node.inputs.size());
  std::vector<at::Tensor> args(node.inputs.size());
  auto make = [&](int32_t i) -> at::Tensor {
    if (!args[i].defined()) {
      real[i] = materialize(node.inputs[i]);
      args[i] = host ? real[i].cpu() : real[i];
    }
    return args[i];
  };
  auto stack = build_stack(node, make, run_on, /*drop_generator=*/true);
  if (node.rng_state.has_value()) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>();
    gen.set_state(*node.rng_state);
    const auto& schema_args = node.op->schema().arguments();
    bool explicit_slot = false;
    for (size_t i = 0; i < schema_args.size(); ++i) {
      if (is_generator_slot(schema_args[i])) {
        stack[i] = c10::IValue(gen);
        explicit_slot = true;
      }
    }
    if (explicit_slot) {
      node.op->callBoxed(stack);
    } else {
      auto cpu_default = at::detail::getDefaultCPUGenerator();
      at::Tensor saved;
      {
        std::lock_guard<std::mutex> lock(cpu_default.mutex());
        saved = cpu_default.get_state();
        cpu_default.set_state(*node.rng_state);
      }
      try {
        node.op->callBoxed(stack);
      } catch (...) {
        std::lock_guard<std::mutex> lock(cpu_default.mutex());
        cpu_default.set_state(saved);
        throw;
      }
      std::lock_guard<std::mutex> lock(cpu_default.mutex());
      cpu_default.set_state(saved);
    }
  } else {
    node.op->callBoxed(stack);
  }
  if (host) {
    // Write back what the op mutated on the host copies.
    for (size_t i = 0; i < args.size(); ++i) {
      if (args[i].defined() && std::find(node.writes.begin(), node.writes.end(), node.inputs[i].storage) != node.writes.end())
        real[i].copy_(args[i]);
    }
  }
  return stack;
}

}  // namespace

std::vector<c10::IValue> call_node(const Node& node, c10::Device device, const Materialize& materialize) {
  const bool on_host = node.rng_state.has_value() && device.type() != c10::DeviceType::CPU;
  try {
    try {
      return call_on(node, device, materialize, on_host);
    } catch (const c10::NotImplementedError&) {
      if (on_host || device.type() == c10::DeviceType::CPU) throw;
      TORCH_WARN("genie: ", node.name(), " has no kernel for ", device.str(),
                 "; running it on the host CPU and copying its results back");
      return call_on(node, device, materialize, /*host=*/true);
    }
  } catch (const std::exception& e) {
    raise_error(ErrorKind::Execution, "genie: " + node.name() + " failed on " +
                                          (on_host ? std::string("cpu") : device.str()) + " for inputs " +
                                          describe_inputs(node) + ": " + e.what());
  }
}

std::vector<c10::IValue> LocalExecutor::call(const Node& node) {
  return call_node(node, device_, [this](const TensorRef& r) { return input_locked(r); });
}

// Note: [Checked results]: an op reading a whole disagreeing output, as it was recorded, gets
// the kernel's own tensor.
at::Tensor LocalExecutor::input_locked(const TensorRef& ref) {
  if (!broken_.empty()) {
    auto it = broken_.find(ref.storage);
    if (it != broken_.end() && it->second.value.defined()) {
      const TensorRef& rec = it->second.recorded;
      if (ref.dtype == rec.dtype && ref.sizes == rec.sizes && ref.strides == rec.strides && ref.offset == rec.offset)
        return it->second.value;
    }
  }
  return materialize_locked(ref);
}

void LocalExecutor::run(const FlushRequest& request) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (const auto& [id, c] : request.constants) env_[id] = storage_to(c.tensor, device_);
  // Note: [Dead after the flush] (recorder.cpp): a storage no tensor holds is dropped once the
  // last node that touches it ran (at once if none does), as eager frees an intermediate, not
  // when the flush ends.
  std::vector<std::vector<StorageId>> drop_after;
  if (!request.dead.empty()) {
    std::unordered_set<StorageId> dead(request.dead.begin(), request.dead.end());
    std::unordered_map<StorageId, size_t> last;
    for (size_t i = 0; i < request.nodes.size(); ++i) {
      const Node& n = *request.nodes[i];
      for (const auto& r : n.inputs)
        if (dead.count(r.storage)) last[r.storage] = i;
      for (const auto& r : n.outputs)
        if (dead.count(r.storage)) last[r.storage] = i;
      for (auto s : n.writes)
        if (dead.count(s)) last[s] = i;
    }
    drop_after.resize(request.nodes.size());
    for (const auto& [s, i] : last) drop_after[i].push_back(s);
    for (auto s : request.dead)  // dead before this flush: nothing here reads it
      if (!last.count(s)) {
        env_.erase(s);
        broken_.erase(s);
      }
  }
  for (size_t i = 0; i < request.nodes.size(); ++i) {
    const auto& n = request.nodes[i];
    auto results = call(*n);
    check_aliases(*n, results);
    for_each_fresh_output(
        *n, results, device_,
        [&](const TensorRef& ref, const at::Tensor& t) {
          // A result the kernel returned as one of its inputs while capture recorded a fresh
          // tensor: give it its own bytes, or later writes to the input would change it too.
          const auto* impl = t.storage().unsafeGetStorageImpl();
          // Only a storage someone else holds too can be an input's (the common fresh result
          // is held by its tensor alone: no lookups).
          if (t.storage().use_count() > 1)
            for (const auto& in : n->inputs) {
              auto it = env_.find(in.storage);
              if (it != env_.end() && it->second.unsafeGetStorageImpl() == impl) {
                bind_locked(ref, t.clone());
                return;
              }
            }
          bind_locked(ref, t);
        },
        [&](const TensorRef& ref, const std::string& why, const at::Tensor& value) {
          env_.erase(ref.storage);
          broken_[ref.storage] = Broken{why, value, ref};
        });
    if (!drop_after.empty())
      for (auto s : drop_after[i]) {
        env_.erase(s);
        broken_.erase(s);
      }
  }
}

// A result capture recorded as a view of an input (in-place, out=, a view op) that the kernel
// returned in other memory: write it where later ops will read it.
void LocalExecutor::check_aliases(const Node& node, const std::vector<c10::IValue>& results) {
  size_t k = 0;
  auto one = [&](const at::Tensor& t) {
    const size_t i = k++;
    if (i >= node.outputs.size() || node.output_alias[i] < 0 || !t.defined()) return;
    const TensorRef& ref = node.outputs[i];
    auto it = env_.find(ref.storage);
    if (it == env_.end() || it->second.unsafeGetStorageImpl() == t.storage().unsafeGetStorageImpl()) return;
    if (!result_mismatch(node, i, t, device_).empty()) {
      raise_error(ErrorKind::Execution, "genie: " + node.name() + " returned its output " + std::to_string(i) +
                                            " as " + describe_geometry(t.scalar_type(), t.sizes()) +
                                            " in new memory where capture recorded a view of its input");
    }
    view_of(it->second, device_, ref.dtype, ref.sizes, ref.strides, ref.offset).copy_(t);
  };
  for (const auto& v : results) {
    if (v.isTensor()) one(v.toTensor());
    else if (v.isTensorList())
      for (const auto& t : v.toTensorList()) one(t);
  }
}

std::vector<c10::IValue> LocalExecutor::run_eager(const Node& node) {
  std::lock_guard<std::mutex> lock(mutex_);
  return call(node);
}

at::Tensor LocalExecutor::fetch(const TensorRef& ref) {
  std::lock_guard<std::mutex> lock(mutex_);
  return materialize_locked(ref);
}

void LocalExecutor::release(const std::vector<StorageId>& ids) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto id : ids) {
    env_.erase(id);
    broken_.erase(id);
  }
}

bool LocalExecutor::has(StorageId id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return env_.count(id) > 0;
}

int64_t LocalExecutor::resident_count() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int64_t>(env_.size());
}

int64_t LocalExecutor::resident_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  int64_t total = 0;
  for (const auto& [id, s] : env_) total += static_cast<int64_t>(s.nbytes());
  return total;
}

}  // namespace genie
