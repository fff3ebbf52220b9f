// pybind11 module dynattn._C_cuda. Like dynattn._C it takes raw pointers and never links libtorch:
// dynattn/backends/cuda.py hands over data_ptr() values, element strides, the device index and torch's
// current stream, and allocates every output and scratch buffer itself.
//
// Argument conventions (all integers):
//   geometry = (B, L0, L1, L2, S0, S1, S2, H)          unused spatial dims: L = S = 1
//   tensor   = (data_ptr, stride_B, stride_L0, stride_L1, stride_L2, stride_H)   last dim contiguous;
//              unused spatial dims have stride 0
//   dtype    = 0 float32, 1 float16, 2 bfloat16        (dynattn::DType)
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>

#include "cuda/kernels.h"
#include "cuda/runtime.h"

namespace py = pybind11;

#ifndef DYNATTN_CUDA_ARCHS
#define DYNATTN_CUDA_ARCHS ""
#endif

namespace {

using dynattn::DType;
using dynattn::TensorArg;
using dynattn::cuda::Launch;
using dynattn::cuda::Shape;
using GeometryTuple = std::array<int64_t, 8>;
using TensorTuple = std::array<int64_t, 6>;

template <typename P>
P* ptr(int64_t p) {
  return reinterpret_cast<P*>(static_cast<std::uintptr_t>(p));
}

Shape make_shape(const GeometryTuple& g, int64_t dqk, int64_t dv) {
  Shape s;
  s.g.B = g[0];
  for (int d = 0; d < 3; ++d) {
    s.g.L[d] = g[1 + d];
    s.g.S[d] = g[4 + d];
  }
  s.g.H = g[7];
  s.Dqk = dqk;
  s.Dv = dv;
  return s;
}

TensorArg make_tensor(const TensorTuple& t) {
  TensorArg a;
  a.data = ptr<const void>(t[0]);
  for (int i = 0; i < 5; ++i) a.stride[i] = t[1 + i];
  return a;
}

DType make_dtype(int code) {
  if (code < 0 || code > 2) throw std::invalid_argument("dynattn._C_cuda: dtype code must be 0, 1 or 2");
  return static_cast<DType>(code);
}

void route(const GeometryTuple& geometry, int64_t dqk, int dtype, const TensorTuple& q, const TensorTuple& k,
           int64_t qr, int64_t kr, int64_t idx_out, int64_t topk, bool per_head, double scale, int device,
           int64_t stream) {
  dynattn::cuda::RouteArgs a;
  a.shape = make_shape(geometry, dqk, 0);
  a.dtype = make_dtype(dtype);
  a.q = make_tensor(q);
  a.k = make_tensor(k);
  a.qr = ptr<float>(qr);
  a.kr = ptr<float>(kr);
  a.idx_out = ptr<int64_t>(idx_out);
  a.topk = topk;
  a.per_head = per_head;
  a.scale = static_cast<float>(scale);
  dynattn::cuda::route(a, Launch{device, static_cast<std::uintptr_t>(stream)});
}

void fwd(const GeometryTuple& geometry, int64_t dqk, int64_t dv, int dtype, const TensorTuple& q,
         const TensorTuple& k, const TensorTuple& v, int64_t idx, int64_t topk, bool per_head, double scale,
         int64_t out, int64_t lse, int device, int64_t stream) {
  dynattn::cuda::FwdArgs a;
  a.shape = make_shape(geometry, dqk, dv);
  a.dtype = make_dtype(dtype);
  a.q = make_tensor(q);
  a.k = make_tensor(k);
  a.v = make_tensor(v);
  a.idx = {ptr<const int64_t>(idx), topk, per_head};
  a.scale = static_cast<float>(scale);
  a.out = ptr<void>(out);
  a.lse = ptr<float>(lse);
  dynattn::cuda::fwd(a, Launch{device, static_cast<std::uintptr_t>(stream)});
}

void bwd(const GeometryTuple& geometry, int64_t dqk, int64_t dv, int dtype, const TensorTuple& q,
         const TensorTuple& k, const TensorTuple& v, const TensorTuple& out, const TensorTuple& dout, int64_t lse,
         int64_t dlse, int64_t delta, int64_t idx, int64_t topk, bool per_head, int64_t inv_offsets,
         int64_t inv_regions, double scale, int64_t dq, int64_t dk, int64_t dv_out, int device, int64_t stream) {
  dynattn::cuda::BwdArgs a;
  a.shape = make_shape(geometry, dqk, dv);
  a.dtype = make_dtype(dtype);
  a.q = make_tensor(q);
  a.k = make_tensor(k);
  a.v = make_tensor(v);
  a.out = make_tensor(out);
  a.dout = make_tensor(dout);
  a.lse = ptr<const float>(lse);
  a.dlse = ptr<const float>(dlse);  // 0 -> nullptr: no lse gradient
  a.delta = ptr<float>(delta);
  a.idx = {ptr<const int64_t>(idx), topk, per_head};
  a.inv_offsets = ptr<const int32_t>(inv_offsets);
  a.inv_regions = ptr<const int32_t>(inv_regions);
  a.scale = static_cast<float>(scale);
  a.dq = ptr<void>(dq);
  a.dk = ptr<void>(dk);
  a.dv = ptr<void>(dv_out);
  dynattn::cuda::bwd(a, Launch{device, static_cast<std::uintptr_t>(stream)});
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "dynattn CUDA kernels (raw-pointer interface; torch integration lives in dynattn/ops.py)";
  m.attr("compiled_archs") = DYNATTN_CUDA_ARCHS;
  m.attr("has_attention_kernels") = true;
  m.attr("head_dims") = py::make_tuple(32, 64, 128);
  m.def("runtime_version", &dynattn::cuda::runtime_version);
  m.def("driver_version", &dynattn::cuda::driver_version);
  m.def("probe_iota", &dynattn::cuda::probe_iota, py::arg("out"), py::arg("n"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("route", &route, "Region means + top-k routing (see csrc/cuda/route.cu)", py::arg("geometry"),
        py::arg("dqk"), py::arg("dtype"), py::arg("q"), py::arg("k"), py::arg("qr"), py::arg("kr"),
        py::arg("idx_out"), py::arg("topk"), py::arg("per_head"), py::arg("scale"), py::arg("device"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("fwd", &fwd, "Routed attention forward (see csrc/cuda/fwd.cu)", py::arg("geometry"), py::arg("dqk"),
        py::arg("dv"), py::arg("dtype"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("idx"), py::arg("topk"),
        py::arg("per_head"), py::arg("scale"), py::arg("out"), py::arg("lse"), py::arg("device"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("bwd", &bwd, "Routed attention backward (see csrc/cuda/bwd.cu)", py::arg("geometry"), py::arg("dqk"),
        py::arg("dv"), py::arg("dtype"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("dout"),
        py::arg("lse"), py::arg("dlse"), py::arg("delta"), py::arg("idx"), py::arg("topk"), py::arg("per_head"),
        py::arg("inv_offsets"), py::arg("inv_regions"), py::arg("scale"), py::arg("dq"), py::arg("dk"),
        py::arg("dv_out"), py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
}
