// Note: [Checking what was found] (python/genie/compile/residency.py) says what is checked and
// why it stays valid; this is the check itself, one pass over a call's argument list with no
// Python object made per argument. Reading a tensor's version through Python (Tensor._version)
// costs an attribute lookup and an int per parameter, which on a serving host with cold caches
// was about 0.2 ms a call for BERT-base's 200 parameters.
#include "bindings/version_check.h"

#include <cstdint>
#include <vector>

#include <torch/csrc/autograd/python_variable.h>

namespace py = pybind11;

namespace genie::bindings {
namespace {

class VersionCheck {
 public:
  // The arguments at `picks` of `args` as they are now: their identities and versions.
  VersionCheck(const py::list& args, std::vector<int64_t> picks) : picks_(std::move(picks)) {
    ids_.reserve(picks_.size());
    versions_.reserve(picks_.size());
    const auto n = static_cast<int64_t>(PyList_GET_SIZE(args.ptr()));
    for (auto i : picks_) {
      if (i < 0 || i >= n) throw py::index_error("genie: VersionCheck: an argument index is out of range");
      PyObject* o = PyList_GET_ITEM(args.ptr(), i);
      if (!THPVariable_Check(o)) throw py::type_error("genie: VersionCheck: an argument is not a tensor");
      const at::Tensor& t = THPVariable_Unpack(o);
      ids_.push_back(reinterpret_cast<std::intptr_t>(o));
      // An inference tensor keeps no version: never assumed unchanged.
      versions_.push_back(t.is_inference() ? -1 : static_cast<int64_t>(t._version()));
    }
  }

  // Whether `args` has the same objects at the same versions at every pick.
  bool holds(const py::list& args) const {
    const auto n = static_cast<int64_t>(PyList_GET_SIZE(args.ptr()));
    for (size_t k = 0; k < picks_.size(); ++k) {
      const auto i = picks_[k];
      if (i >= n) return false;
      PyObject* o = PyList_GET_ITEM(args.ptr(), i);
      if (reinterpret_cast<std::intptr_t>(o) != ids_[k] || versions_[k] < 0) return false;
      // Same address: the caller's weak references make sure it is the same object, but a
      // check of the type costs nothing and keeps a stale address from being read as one.
      if (!THPVariable_Check(o)) return false;
      const at::Tensor& t = THPVariable_Unpack(o);
      if (t.is_inference() || static_cast<int64_t>(t._version()) != versions_[k]) return false;
    }
    return true;
  }

  size_t size() const { return picks_.size(); }

 private:
  std::vector<int64_t> picks_;
  std::vector<std::intptr_t> ids_;
  std::vector<int64_t> versions_;
};

}  // namespace

void register_version_check(py::module_& m) {
  py::class_<VersionCheck>(m, "VersionCheck")
      .def(py::init<const py::list&, std::vector<int64_t>>(), py::arg("args"), py::arg("picks"))
      .def("holds", &VersionCheck::holds, py::arg("args"))
      .def("__len__", &VersionCheck::size);
}

}  // namespace genie::bindings
