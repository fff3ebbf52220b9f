// pybind11 module dynattn._C_cuda. Like dynattn._C it takes raw pointers and never links libtorch.
#include <pybind11/pybind11.h>

#include "cuda/runtime.h"

namespace py = pybind11;

#ifndef DYNATTN_CUDA_ARCHS
#define DYNATTN_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "dynattn CUDA kernels (raw-pointer interface; torch integration lives in dynattn/ops.py)";
  m.attr("compiled_archs") = DYNATTN_CUDA_ARCHS;
  // No attention kernels yet: dynattn.ops never selects this backend while this is False.
  m.attr("has_attention_kernels") = false;
  m.def("runtime_version", &dynattn::cuda::runtime_version);
  m.def("driver_version", &dynattn::cuda::driver_version);
  m.def("probe_iota", &dynattn::cuda::probe_iota, py::arg("out"), py::arg("n"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
}
