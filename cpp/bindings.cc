// The one pybind11 binding file of rasd._core. C++ knows nothing of Python elsewhere: this file
// converts contiguous numpy arrays to pointers, releases the GIL on long calls, and lets pybind11 map
// std::invalid_argument -> ValueError and std::out_of_range -> IndexError. Validation and policy
// live in the Python wrappers (rasd/*.py).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "rasd/tree.h"

namespace py = pybind11;

namespace {

using I32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& v) {
  auto* owned = new std::vector<T>(std::move(v));
  py::capsule free_when_done(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>({static_cast<py::ssize_t>(owned->size())}, {sizeof(T)}, owned->data(),
                        free_when_done);
}

// ---------------------------------------------------------------------------------------------
// Token trees
// ---------------------------------------------------------------------------------------------
void bind_tree(py::module_& m) {
  m.def(
      "tree_depths",
      [](I32Array parents) {
        if (parents.ndim() != 1) throw std::invalid_argument("parents must be a 1-D int32 array");
        return to_numpy(rasd::tree_depths(parents.data(), parents.shape(0)));
      },
      py::arg("parents"),
      "Depth of every node of a parent-pointer tree (children of the root have depth 1).\n"
      "parents: int32 [N] with -1 <= parents[i] < i. Returns int32 [N].");
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "rasd native core: suffix-automaton datastore, tree utilities and CPU kernels.";
  m.attr("__version__") = RASD_VERSION;
  bind_tree(m);
}
