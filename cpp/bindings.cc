// The one pybind11 binding file of rasd._core. C++ knows nothing of Python elsewhere: this file
// converts contiguous numpy arrays to pointers, releases the GIL on long calls, and lets pybind11 map
// std::invalid_argument -> ValueError and std::out_of_range -> IndexError. Validation and policy
// live in the Python wrappers (rasd/*.py).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <string>
#include <tuple>

#include "rasd/datastore_file.h"
#include "rasd/distance_scan.h"
#include "rasd/small_gemm.h"
#include "rasd/suffix_automaton.h"
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
      [](py::array x, py::array w, std::optional<py::array> bias, py::array out, std::optional<py::array> scale) {
        require(x, "x", 2, 'f', 4);
        require(out, "out", 2, 'f', 4);
        const bool int8 = w.itemsize() == 1 && w.dtype().kind() == 'i';
        const bool bf16 = !int8 && w.dtype().kind() != 'f';
        if (w.ndim() != 2 || !(w.flags() & py::array::c_style) || (bf16 && w.itemsize() != 2) ||
            (!int8 && !bf16 && w.itemsize() != 4)) {
          throw std::invalid_argument(
              "w must be a C-contiguous 2-D float32, bf16 (int16/uint16) or int8 (with scale) array");
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
        const float* sp = nullptr;
        if (int8 != scale.has_value()) {
          throw std::invalid_argument(int8 ? "int8 weights need scale (float32 [m], one per weight row)"
                                           : "scale is for int8 weights only");
        }
        if (scale) {
          require(*scale, "scale", 1, 'f', 4);
          if (scale->shape(0) != rows) throw std::invalid_argument("scale must have shape [m]");
          sp = static_cast<const float*>(scale->data());
        }
        const auto* xp = static_cast<const float*>(x.data());
        auto* yp = static_cast<float*>(out.mutable_data());
        py::gil_scoped_release release;
        if (int8) {
          rasd::small_gemm_i8(xp, n, k, static_cast<const int8_t*>(w.data()), sp, rows, b, yp, rows);
        } else if (bf16) {
          rasd::small_gemm_bf16(xp, n, k, static_cast<const uint16_t*>(w.data()), rows, b, yp, rows);
        } else {
          rasd::small_gemm_f32(xp, n, k, static_cast<const float*>(w.data()), rows, b, yp, rows);
        }
      },
      py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("out"), py::arg("scale") = py::none(),
      "out[n, m] = x[n, k] @ (scale[:, None] * w[m, k]).T (+ bias[m]); w is float32, bf16 bit patterns\n"
      "(int16/uint16), or int8 with a float32 scale per row. All arrays C-contiguous; streams w once for all\n"
      "n rows (see cpp/include/rasd/small_gemm.h).");
  m.def("small_gemm_isa", &rasd::small_gemm_isa, "The small-GEMM kernel in use: 'avx512', 'avx2' or 'portable'.");
  m.def("small_gemm_isas", &rasd::small_gemm_isas, "The small-GEMM kernels this CPU and build can run, best first.");
  m.def("set_small_gemm_isa", &rasd::set_small_gemm_isa, py::arg("name"),
        "Force one small-GEMM kernel ('auto' = the best available); ValueError if unknown or unsupported.");
  m.def("set_num_threads", &rasd::set_num_threads, py::arg("n"),
        "Threads for rasd's native kernels (0 = all hardware threads).");
  m.def("get_num_threads", &rasd::get_num_threads);
  m.def(
      "bf16_distance_scan",
      [](py::array dots, int64_t nq, py::array key_sq, py::array query_sq, py::array limit) {
        if (dots.itemsize() != 2 || dots.dtype().kind() == 'f' || dots.ndim() != 2 ||
            !(dots.flags() & py::array::c_style))
          throw std::invalid_argument("dots must be a C-contiguous 2-D array of bf16 bit patterns (int16/uint16)");
        require(key_sq, "key_sq", 1, 'f', 4);
        require(query_sq, "query_sq", 1, 'f', 4);
        require(limit, "limit", 1, 'f', 4);
        const int64_t rows = dots.shape(0), ld = dots.shape(1);
        if (nq < 0 || nq > ld) throw std::invalid_argument("nq must be in [0, dots.shape[1]]");
        if (key_sq.shape(0) != rows) throw std::invalid_argument("key_sq must have shape [dots.shape[0]]");
        if (query_sq.shape(0) != nq || limit.shape(0) != nq)
          throw std::invalid_argument("query_sq and limit must have shape [nq]");
        rasd::ScanHits hits;
        {
          py::gil_scoped_release release;
          rasd::bf16_distance_scan(static_cast<const uint16_t*>(dots.data()), rows, ld, nq,
                                   static_cast<const float*>(key_sq.data()), static_cast<const float*>(query_sq.data()),
                                   static_cast<const float*>(limit.data()), hits);
        }
        return py::make_tuple(to_numpy(std::move(hits.rows)), to_numpy(std::move(hits.query)),
                              to_numpy(std::move(hits.approx)));
      },
      py::arg("dots"), py::arg("nq"), py::arg("key_sq"), py::arg("query_sq"), py::arg("limit"),
      "Pairs (row, query) of a block of bf16 dot products [rows, ld] (queries 0..nq-1) whose float32\n"
      "key_sq[row] + query_sq[q] - 2 * dots[row, q] <= limit[q]: (rows int64, query int32, approx float32),\n"
      "row-major. The candidate filter of ExactL2Index's bf16 first pass (see cpp/include/rasd/distance_scan.h).");
}

// ---------------------------------------------------------------------------------------------
// Suffix-automaton datastore (rasd/datastore.py owns validation, tokenizer identity and matchers)
// ---------------------------------------------------------------------------------------------
using TreeTuple = std::tuple<py::array_t<int32_t>, py::array_t<int32_t>, py::array_t<float>, py::array_t<int64_t>, int32_t>;

TreeTuple to_python(rasd::RetrievedTree&& t) {
  const int32_t match = t.match_length;
  return {to_numpy(std::move(t.tokens)), to_numpy(std::move(t.parents)), to_numpy(std::move(t.scores)),
          to_numpy(std::move(t.counts)), match};
}

std::pair<const int32_t*, int64_t> token_span(const I32Array& a) {
  if (a.ndim() != 1) throw std::invalid_argument("token arrays must be 1-D");
  return {a.data(), a.shape(0)};
}

rasd::RetrieveOptions options(int32_t max_nodes, int32_t max_depth, int32_t min_match, int64_t min_count,
                              int64_t backoff_min_count, bool raw_counts) {
  rasd::RetrieveOptions o;
  o.max_nodes = max_nodes;
  o.max_depth = max_depth;
  o.min_match = min_match;
  o.min_count = min_count;
  o.backoff_min_count = backoff_min_count;
  o.raw_counts = raw_counts;
  return o;
}

void check_match(const rasd::MappedDatastore& d, int32_t state, int32_t length) {
  if (state < 0 || state >= d.num_states() || length < 0 || length > d.graph().len(state)) {
    throw std::out_of_range("invalid matcher state");
  }
}

// Text stored in a file may not be valid UTF-8 (a damaged or foreign file): decode with replacement
// instead of raising a bare UnicodeDecodeError without context.
py::str lenient_str(const std::string& s) {
  PyObject* obj = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "replace");
  if (!obj) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(obj);
}

#define RASD_RETRIEVE_ARGS                                                                            \
  py::arg("state"), py::arg("length"), py::arg("max_nodes") = 64, py::arg("max_depth") = 16,         \
      py::arg("min_match") = 1, py::arg("min_count") = 1, py::arg("backoff_min_count") = 0,          \
      py::arg("raw_counts") = false

void bind_datastore(py::module_& m) {
  m.def(
      "crc32",
      [](py::buffer data, uint32_t crc) {
        const py::buffer_info info = data.request();
        const size_t bytes = static_cast<size_t>(info.size * info.itemsize);
        py::gil_scoped_release release;
        return rasd::crc32(info.ptr, bytes, crc);
      },
      py::arg("data"), py::arg("crc") = 0, "CRC-32 (zlib's polynomial) of a contiguous buffer, as the file format uses.");
  using rasd::SuffixAutomaton;
  // Thread safety lives in the core (SuffixAutomaton locks every operation); the binding only releases
  // the GIL around the calls.
  py::class_<SuffixAutomaton>(m, "SuffixAutomaton", "Mutable generalized suffix automaton over int32 tokens.")
      .def(py::init<>())
      .def(
          "add_document",
          [](SuffixAutomaton& s, I32Array tokens) {
            auto [p, n] = token_span(tokens);
            py::gil_scoped_release release;
            return s.add_document(p, n);
          },
          py::arg("tokens"))
      .def(
          "extend",
          [](SuffixAutomaton& s, I32Array tokens) {
            auto [p, n] = token_span(tokens);
            py::gil_scoped_release release;
            s.extend(p, n);
          },
          py::arg("tokens"))
      .def(
          "feed",
          [](const SuffixAutomaton& s, int32_t state, int32_t length, I32Array tokens) {
            auto [p, n] = token_span(tokens);
            py::gil_scoped_release release;
            const auto r = s.match(rasd::MatchState{state, length}, p, n);
            return std::make_pair(r.state, r.length);
          },
          py::arg("state"), py::arg("length"), py::arg("tokens"))
      .def(
          "retrieve",
          [](const SuffixAutomaton& s, int32_t state, int32_t length, int32_t max_nodes, int32_t max_depth,
             int32_t min_match, int64_t min_count, int64_t backoff_min_count, bool raw_counts) {
            const auto opt = options(max_nodes, max_depth, min_match, min_count, backoff_min_count, raw_counts);
            rasd::RetrievedTree tree;
            {
              py::gil_scoped_release release;
              tree = s.retrieve(rasd::MatchState{state, length}, opt);
            }
            return to_python(std::move(tree));
          },
          RASD_RETRIEVE_ARGS)
      .def("tail_match",
           [](const SuffixAutomaton& s) {
             const auto t = s.tail_match();
             return std::make_pair(t.state, t.length);
           })
      .def(
          "save",
          [](const SuffixAutomaton& s, const std::string& path, const std::string& name, const std::string& hash,
             int64_t vocab, const std::string& full_hash) {
            if (!full_hash.empty() && (full_hash.size() != 64 || full_hash.find_first_not_of("0123456789abcdef") != std::string::npos)) {
              throw std::invalid_argument("tokenizer_full_hash must be 64 lowercase hex characters or empty");
            }
            py::gil_scoped_release release;
            s.save(rasd::DatastoreMeta{name, hash, vocab, full_hash}, path);
          },
          py::arg("path"), py::arg("tokenizer_name"), py::arg("tokenizer_hash"), py::arg("vocab_size"),
          py::arg("tokenizer_full_hash") = "")
      .def_property_readonly("num_tokens", &SuffixAutomaton::num_tokens)
      .def_property_readonly("num_documents", &SuffixAutomaton::num_documents)
      .def_property_readonly("num_states", &SuffixAutomaton::num_states)
      .def_property_readonly("num_edges", &SuffixAutomaton::num_edges)
      .def_property_readonly("max_token", &SuffixAutomaton::max_token);

  using rasd::MappedDatastore;
  py::class_<MappedDatastore>(m, "MappedDatastore", "A datastore file mapped read-only (shared between processes).")
      .def(py::init([](const std::string& path, bool verify) {
             py::gil_scoped_release release;
             return std::make_unique<MappedDatastore>(path, verify);
           }),
           py::arg("path"), py::arg("verify_checksums") = true)
      .def(
          "feed",
          [](const MappedDatastore& d, int32_t state, int32_t length, I32Array tokens) {
            auto [p, n] = token_span(tokens);
            py::gil_scoped_release release;
            check_match(d, state, length);
            const auto r = rasd::match_feed(d.graph(), rasd::MatchState{state, length}, p, n);
            return std::make_pair(r.state, r.length);
          },
          py::arg("state"), py::arg("length"), py::arg("tokens"))
      .def(
          "retrieve",
          [](const MappedDatastore& d, int32_t state, int32_t length, int32_t max_nodes, int32_t max_depth,
             int32_t min_match, int64_t min_count, int64_t backoff_min_count, bool raw_counts) {
            const auto opt = options(max_nodes, max_depth, min_match, min_count, backoff_min_count, raw_counts);
            rasd::RetrievedTree tree;
            {
              py::gil_scoped_release release;
              check_match(d, state, length);
              tree = rasd::retrieve(d.graph(), rasd::MatchState{state, length}, opt);
            }
            return to_python(std::move(tree));
          },
          RASD_RETRIEVE_ARGS)
      .def_property_readonly("num_tokens", &MappedDatastore::num_tokens)
      .def_property_readonly("num_documents", &MappedDatastore::num_documents)
      .def_property_readonly("num_states", &MappedDatastore::num_states)
      .def_property_readonly("num_edges", &MappedDatastore::num_edges)
      .def_property_readonly("file_bytes", &MappedDatastore::file_bytes)
      .def_property_readonly("version", &MappedDatastore::version)
      .def_property_readonly("tokenizer_name", [](const MappedDatastore& d) { return lenient_str(d.meta().tokenizer_name); })
      .def_property_readonly("tokenizer_hash", [](const MappedDatastore& d) { return lenient_str(d.meta().tokenizer_hash); })
      .def(
          "check_states",
          [](const MappedDatastore& d, int64_t begin, int64_t end) {
            py::gil_scoped_release release;
            d.check_states(begin, end);
          },
          py::arg("begin"), py::arg("end"),
          "Full invariant check of states [begin, end) (ValueError naming the first problem).")
      .def(
          "check_sections",
          [](const MappedDatastore& d) {
            py::gil_scoped_release release;
            d.check_sections();
          },
          "Every section's CRC32 and the document starts (ValueError naming the first problem).")
      .def_property_readonly("vocab_size", [](const MappedDatastore& d) { return d.meta().vocab_size; })
      .def_property_readonly("tokenizer_full_hash", [](const MappedDatastore& d) { return d.meta().tokenizer_full_hash; });
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "rasd native core: suffix-automaton datastore, tree utilities and CPU kernels.";
  m.attr("__version__") = RASD_VERSION;
  bind_tree(m);
  bind_small_gemm(m);
  bind_datastore(m);
}
