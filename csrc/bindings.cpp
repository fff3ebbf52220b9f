// pybind11 module dynattn._C: the CPU kernels behind dynattn/backends/cpu.py.
//
// No libtorch: Python passes every tensor as (data_ptr, shape, strides) of its 6-D view
// (B, L0, L1, L2, H, D) (missing spatial dims inserted with size 1), strides in elements. Outputs are
// allocated contiguous by Python. The GIL is released while the kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "common/params.h"
#include "cpu/api.h"
#include "cpu/driver.h"
#include "cpu/thread_pool.h"

namespace py = pybind11;
using dynattn::DType;
using dynattn::Geometry;
using dynattn::TensorArg;

namespace {

using TensorDesc = std::tuple<uintptr_t, std::vector<int64_t>, std::vector<int64_t>>;

struct Tensor6 {
  uintptr_t ptr;
  int64_t shape[6];
  TensorArg arg;
};

using dynattn::cpu::require;

Tensor6 parse(const TensorDesc& d, const char* name) {
  const auto& shape = std::get<1>(d);
  const auto& stride = std::get<2>(d);
  require(shape.size() == 6 && stride.size() == 6,
          std::string(name) + ": expected a 6-D (B, L0, L1, L2, H, D) shape and strides");
  require(stride[5] == 1 || shape[5] == 1, std::string(name) + ": the last dim must be contiguous");
  Tensor6 t;
  t.ptr = std::get<0>(d);
  bool empty = false;
  for (int i = 0; i < 6; ++i) {
    require(shape[i] >= 0, std::string(name) + ": negative size");
    t.shape[i] = shape[i];
    empty = empty || shape[i] == 0;
  }
  require(t.ptr != 0 || empty, std::string(name) + ": null data pointer");
  t.arg.data = reinterpret_cast<const void*>(t.ptr);
  for (int i = 0; i < 5; ++i) t.arg.stride[i] = stride[i];
  return t;
}

// The first five dims (B, L0, L1, L2, H) of `t` must match `ref`; the last must equal `d` if d >= 0.
void same_grid(const Tensor6& t, const char* name, const Tensor6& ref, int64_t d = -1) {
  for (int i = 0; i < 5; ++i)
    require(t.shape[i] == ref.shape[i], std::string(name) + ": batch/grid/head sizes differ from q's");
  require(d < 0 || t.shape[5] == d,
          std::string(name) + ": last dim is " + std::to_string(t.shape[5]) + ", expected " + std::to_string(d));
}

DType parse_dtype(const std::string& s) {
  if (s == "float32") return DType::Float32;
  if (s == "float16") return DType::Float16;
  if (s == "bfloat16") return DType::BFloat16;
  if (s == "float64") return DType::Float64;
  throw std::invalid_argument("unsupported dtype '" + s + "' (expected float32, float16, bfloat16 or float64)");
}

Geometry geometry(const Tensor6& q, const std::vector<int64_t>& regions) {
  require(regions.size() == 3, "num_regions: expected 3 entries (one per padded spatial dim)");
  Geometry g;
  g.B = q.shape[0];
  for (int d = 0; d < 3; ++d) {
    g.L[d] = q.shape[1 + d];
    g.S[d] = regions[d];
  }
  g.H = q.shape[4];
  dynattn::cpu::check_geometry(g);
  return g;
}

dynattn::RouteIndex route_index(uintptr_t ptr, const std::vector<int64_t>& shape, const Geometry& g) {
  const int64_t R = dynattn::num_regions(g);
  const bool shared = shape.size() == 3 && shape[0] == g.B && shape[1] == R;
  const bool per_head = shape.size() == 4 && shape[0] == g.B && shape[1] == g.H && shape[2] == R;
  require(shared || per_head, "idx: expected shape (B, R, topk) or (B, H, R, topk) with B=" + std::to_string(g.B) +
                                  ", H=" + std::to_string(g.H) + ", R=" + std::to_string(R));
  require(ptr != 0 || g.B == 0, "idx: null data pointer");
  return {reinterpret_cast<const int64_t*>(ptr), shape.back(), per_head};
}

void route(const TensorDesc& q_, const TensorDesc& k_, const std::vector<int64_t>& regions, int64_t topk,
           bool per_head, double scale, const std::string& dtype, uintptr_t idx, int num_threads) {
  const Tensor6 q = parse(q_, "q"), k = parse(k_, "k");
  same_grid(k, "k", q, q.shape[5]);
  require(idx != 0 || q.shape[0] == 0, "idx: null data pointer");
  dynattn::RouteParams p;
  p.g = geometry(q, regions);
  p.regions = nullptr;  // set by the driver
  p.D = q.shape[5];
  p.dtype = parse_dtype(dtype);
  p.q = q.arg;
  p.k = k.arg;
  p.topk = topk;
  p.per_head = per_head;
  p.scale = scale;
  py::gil_scoped_release release;
  dynattn::cpu::route(p, reinterpret_cast<int64_t*>(idx), num_threads);
}

// The fields forward and backward params share: geometry, head dims, dtype, scale, q/k/v and the routing index.
template <class Params>
void set_attention_inputs(Params& p, const Tensor6& q, const Tensor6& k, const Tensor6& v, uintptr_t idx,
                          const std::vector<int64_t>& idx_shape, const std::vector<int64_t>& regions, double scale,
                          const std::string& dtype) {
  p.g = geometry(q, regions);
  p.regions = nullptr;  // set by the driver
  p.Dqk = q.shape[5];
  p.Dv = v.shape[5];
  p.dtype = parse_dtype(dtype);
  p.scale = scale;
  p.q = q.arg;
  p.k = k.arg;
  p.v = v.arg;
  p.idx = route_index(idx, idx_shape, p.g);
}

void fwd(const TensorDesc& q_, const TensorDesc& k_, const TensorDesc& v_, uintptr_t idx,
         const std::vector<int64_t>& idx_shape, const std::vector<int64_t>& regions, double scale,
         const std::string& dtype, uintptr_t out, uintptr_t lse, int num_threads) {
  const Tensor6 q = parse(q_, "q"), k = parse(k_, "k"), v = parse(v_, "v");
  same_grid(k, "k", q, q.shape[5]);
  same_grid(v, "v", q);
  require((out != 0 && lse != 0) || q.shape[0] == 0, "out/lse: null data pointer");
  dynattn::FwdParams p;
  set_attention_inputs(p, q, k, v, idx, idx_shape, regions, scale, dtype);
  p.out = reinterpret_cast<void*>(out);
  p.lse = reinterpret_cast<void*>(lse);
  p.stream_out = false;  // chosen by the driver
  py::gil_scoped_release release;
  dynattn::cpu::attention_fwd(p, num_threads);
}

void bwd(const TensorDesc& dout_, uintptr_t dlse, const TensorDesc& q_, const TensorDesc& k_,
         const TensorDesc& v_, const TensorDesc& out_, uintptr_t lse, uintptr_t idx,
         const std::vector<int64_t>& idx_shape, const std::vector<int64_t>& regions, double scale,
         const std::string& dtype, uintptr_t dq, uintptr_t dk, uintptr_t dv, int num_threads) {
  const Tensor6 q = parse(q_, "q"), k = parse(k_, "k"), v = parse(v_, "v");
  const Tensor6 out = parse(out_, "out"), dout = parse(dout_, "dout");
  same_grid(k, "k", q, q.shape[5]);
  same_grid(v, "v", q);
  same_grid(out, "out", q, v.shape[5]);
  same_grid(dout, "dout", q, v.shape[5]);
  require((lse != 0 && dq != 0 && dk != 0 && dv != 0) || q.shape[0] == 0, "lse/dq/dk/dv: null data pointer");
  dynattn::BwdParams p;
  set_attention_inputs(p, q, k, v, idx, idx_shape, regions, scale, dtype);
  p.out = out.arg;
  p.dout = dout.arg;
  p.lse = reinterpret_cast<const void*>(lse);
  p.dlse = reinterpret_cast<const void*>(dlse);  // 0 when absent
  p.delta = nullptr;
  p.inv_offsets = nullptr;
  p.inv_regions = nullptr;
  p.dq = reinterpret_cast<void*>(dq);
  p.dk = reinterpret_cast<void*>(dk);
  p.dv = reinterpret_cast<void*>(dv);
  p.stream_out = false;  // chosen by the driver
  py::gil_scoped_release release;
  dynattn::cpu::attention_bwd(p, num_threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dynattn CPU kernels (raw-pointer interface; torch integration lives in dynattn/ops.py)";
  m.def("cpu_threading", &dynattn::cpu::threading_backend,
        "Where the CPU kernels' parallel loops run: 'openmp' (the process's OpenMP team, i.e. torch's) or 'pool'.");
  m.def("cpu_isa", &dynattn::cpu::isa_name, "The kernel ISA in use: 'avx512', 'avx2' or 'scalar'.");
  m.def("set_cpu_isa", &dynattn::cpu::set_isa, py::arg("name"),
        "Testing hook: switch the kernel ISA of this process (like DYNATTN_CPU_ISA, but at run time).");
  m.def("route", &route, py::arg("q"), py::arg("k"), py::arg("num_regions"), py::arg("topk"), py::arg("per_head"),
        py::arg("scale"), py::arg("dtype"), py::arg("idx"), py::arg("num_threads"));
  m.def("fwd", &fwd, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("idx"), py::arg("idx_shape"),
        py::arg("num_regions"), py::arg("scale"), py::arg("dtype"), py::arg("out"), py::arg("lse"),
        py::arg("num_threads"));
  m.def("bwd", &bwd, py::arg("dout"), py::arg("dlse"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("idx"), py::arg("idx_shape"), py::arg("num_regions"), py::arg("scale"),
        py::arg("dtype"), py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("num_threads"));
}
