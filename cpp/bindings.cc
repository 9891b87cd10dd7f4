// The one pybind11 binding file of rasd._core. C++ knows nothing of Python elsewhere: this file
// converts contiguous numpy arrays to pointers, releases the GIL on long calls, and lets pybind11 map
// std::invalid_argument -> ValueError and std::out_of_range -> IndexError. Validation and policy
// live in the Python wrappers (rasd/*.py).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "rasd/small_gemm.h"
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

// ---------------------------------------------------------------------------------------------
// Small-batch GEMM for CPU linear layers (rasd/fastpath.py owns the policy of when to use it)
// ---------------------------------------------------------------------------------------------
// Arrays are checked, never converted: a silent copy of a weight matrix would cost more than the
// kernel saves, so the Python side must pass exactly what is asked for.
void require(const py::array& a, const char* name, py::ssize_t ndim, char kind, py::ssize_t itemsize) {
  if (a.ndim() != ndim || a.dtype().kind() != kind || a.itemsize() != itemsize ||
      !(a.flags() & py::array::c_style)) {
    throw std::invalid_argument(std::string(name) + " must be a C-contiguous " + std::to_string(ndim) +
                                "-D array of " + (kind == 'f' ? "float32" : "bf16 bit patterns (int16/uint16)"));
  }
}

void bind_small_gemm(py::module_& m) {
  m.def(
      "small_gemm",
      [](py::array x, py::array w, std::optional<py::array> bias, py::array out) {
        require(x, "x", 2, 'f', 4);
        require(out, "out", 2, 'f', 4);
        const bool bf16 = w.dtype().kind() != 'f';
        if (bf16) {
          if (w.itemsize() != 2 || w.ndim() != 2 || !(w.flags() & py::array::c_style))
            throw std::invalid_argument("w must be a C-contiguous 2-D float32 or bf16 (int16/uint16) array");
        } else {
          require(w, "w", 2, 'f', 4);
        }
        const int64_t n = x.shape(0), k = x.shape(1), rows = w.shape(0);
        if (w.shape(1) != k) throw std::invalid_argument("x and w disagree on the inner dimension");
        if (out.shape(0) != n || out.shape(1) != rows) throw std::invalid_argument("out must have shape [n, m]");
        if (!out.writeable()) throw std::invalid_argument("out must be writeable");
        const float* b = nullptr;
        if (bias) {
          require(*bias, "bias", 1, 'f', 4);
          if (bias->shape(0) != rows) throw std::invalid_argument("bias must have shape [m]");
          b = static_cast<const float*>(bias->data());
        }
        const auto* xp = static_cast<const float*>(x.data());
        auto* yp = static_cast<float*>(out.mutable_data());
        py::gil_scoped_release release;
        if (bf16) {
          rasd::small_gemm_bf16(xp, n, k, static_cast<const uint16_t*>(w.data()), rows, b, yp, rows);
        } else {
          rasd::small_gemm_f32(xp, n, k, static_cast<const float*>(w.data()), rows, b, yp, rows);
        }
      },
      py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("out"),
      "out[n, m] = x[n, k] @ w[m, k].T (+ bias[m]); w is float32 or bf16 bit patterns (int16/uint16).\n"
      "All arrays C-contiguous; streams w once for all n rows (see cpp/include/rasd/small_gemm.h).");
  m.def("small_gemm_has_avx2", &rasd::small_gemm_has_avx2, "True if the AVX2/FMA kernels are in use.");
  m.def("set_num_threads", &rasd::set_num_threads, py::arg("n"),
        "Threads for rasd's native kernels (0 = all hardware threads).");
  m.def("get_num_threads", &rasd::get_num_threads);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "rasd native core: suffix-automaton datastore, tree utilities and CPU kernels.";
  m.attr("__version__") = RASD_VERSION;
  bind_tree(m);
  bind_small_gemm(m);
}
