// XLA FFI handlers that fold a block into a triangular R with LAPACK ?tpqrt.
//
// ?tpqrt factors [A; B], A an n x n upper triangle and B an m x n block, by
// blocked Householder reflectors that each touch one row of A and the rows
// of B: R's zeros are never read or written (docs/method.md §3). The
// handlers take A and B column-major (the caller passes R^T and X_b^T,
// row-major), loop over any leading batch dimensions, and overwrite A with
// the new R (upper triangle; the strict lower part is left as it came) and
// B with the reflectors' vectors.
//
// LAPACK itself is the one jaxlib and SciPy use: its function pointers come
// from scipy.linalg.cython_lapack's capsules (`set_lapack`), as jaxlib's own
// CPU kernels get theirs. No Python, no GIL, on the XLA thread that runs the
// call.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

template <typename Real>
using TpqrtFn = void(int* m, int* n, int* l, int* nb, Real* a, int* lda,
                     Real* b, int* ldb, Real* t, int* ldt, Real* work,
                     int* info);

TpqrtFn<float>* stpqrt_fn = nullptr;
TpqrtFn<double>* dtpqrt_fn = nullptr;

template <typename Real>
TpqrtFn<Real>* Lapack();
template <>
TpqrtFn<float>* Lapack<float>() { return stpqrt_fn; }
template <>
TpqrtFn<double>* Lapack<double>() { return dtpqrt_fn; }

// r: float[..., n, n] (R^T row-major = R column-major), x: float[..., n, m]
// (X_b^T row-major = X_b column-major); outputs alias them.
template <ffi::DataType T>
ffi::Error Fold(ffi::Buffer<T> r, ffi::Buffer<T> x, int64_t block_size,
                ffi::ResultBuffer<T> r_out, ffi::ResultBuffer<T> x_out) {
  using Real = ffi::NativeType<T>;
  TpqrtFn<Real>* tpqrt = Lapack<Real>();
  if (tpqrt == nullptr) {
    return ffi::Error::InvalidArgument(
        "ctxlr tpqrt: LAPACK not set (call set_lapack first)");
  }
  auto rd = r.dimensions();
  auto xd = x.dimensions();
  const size_t rank = rd.size();
  if (rank < 2 || xd.size() != rank || rd[rank - 1] != rd[rank - 2] ||
      xd[rank - 2] != rd[rank - 1]) {
    return ffi::Error::InvalidArgument(
        "ctxlr tpqrt: expected r[..., n, n] and x[..., n, m]");
  }
  int64_t batch = 1;
  for (size_t i = 0; i + 2 < rank; ++i) {
    if (rd[i] != xd[i]) {
      return ffi::Error::InvalidArgument(
          "ctxlr tpqrt: r and x have different batch dimensions");
    }
    batch *= rd[i];
  }
  const int64_t n64 = rd[rank - 1], m64 = xd[rank - 1];
  if (n64 > INT32_MAX || m64 > INT32_MAX || n64 * m64 > INT32_MAX) {
    return ffi::Error::InvalidArgument("ctxlr tpqrt: too large for LAPACK");
  }
  Real* a = r_out->typed_data();
  Real* b = x_out->typed_data();
  const int64_t a_size = n64 * n64, b_size = n64 * m64;
  if (a != r.typed_data()) {
    std::memcpy(a, r.typed_data(), batch * a_size * sizeof(Real));
  }
  if (b != x.typed_data()) {
    std::memcpy(b, x.typed_data(), batch * b_size * sizeof(Real));
  }
  if (n64 == 0 || m64 == 0) return ffi::Error::Success();
  int m = static_cast<int>(m64), n = static_cast<int>(n64), l = 0;
  int nb = static_cast<int>(std::clamp<int64_t>(block_size, 1, n64));
  int lda = n, ldb = m, ldt = nb, info = 0;
  std::vector<Real> t(static_cast<size_t>(nb) * n);
  std::vector<Real> work(static_cast<size_t>(nb) * n);
  for (int64_t i = 0; i < batch; ++i) {
    tpqrt(&m, &n, &l, &nb, a + i * a_size, &lda, b + i * b_size, &ldb,
          t.data(), &ldt, work.data(), &info);
    if (info != 0) {
      return ffi::Error::Internal("ctxlr tpqrt: LAPACK info " +
                                  std::to_string(info));
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FoldF32, Fold<ffi::F32>,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block_size")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FoldF64, Fold<ffi::F64>,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F64>>()
                                  .Arg<ffi::Buffer<ffi::F64>>()
                                  .Attr<int64_t>("block_size")
                                  .Ret<ffi::Buffer<ffi::F64>>()
                                  .Ret<ffi::Buffer<ffi::F64>>());

namespace {

PyObject* Handlers(PyObject*, PyObject*) {
  PyObject* out = PyDict_New();
  if (out == nullptr) return nullptr;
  struct {
    const char* name;
    void* fn;
  } entries[] = {{"float32", reinterpret_cast<void*>(FoldF32)},
                 {"float64", reinterpret_cast<void*>(FoldF64)}};
  for (const auto& e : entries) {
    PyObject* capsule = PyCapsule_New(e.fn, nullptr, nullptr);
    if (capsule == nullptr || PyDict_SetItemString(out, e.name, capsule)) {
      Py_XDECREF(capsule);
      Py_DECREF(out);
      return nullptr;
    }
    Py_DECREF(capsule);
  }
  return out;
}

void* CapsulePointer(PyObject* capsule) {
  if (!PyCapsule_CheckExact(capsule)) {
    PyErr_SetString(PyExc_TypeError, "expected a PyCapsule");
    return nullptr;
  }
  return PyCapsule_GetPointer(capsule, PyCapsule_GetName(capsule));
}

PyObject* SetLapack(PyObject*, PyObject* args) {
  PyObject *s, *d;
  if (!PyArg_ParseTuple(args, "OO", &s, &d)) return nullptr;
  void* sp = CapsulePointer(s);
  if (sp == nullptr) return nullptr;
  void* dp = CapsulePointer(d);
  if (dp == nullptr) return nullptr;
  stpqrt_fn = reinterpret_cast<TpqrtFn<float>*>(sp);
  dtpqrt_fn = reinterpret_cast<TpqrtFn<double>*>(dp);
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"handlers", Handlers, METH_NOARGS,
     "{dtype name: PyCapsule of the XLA FFI fold handler}."},
    {"set_lapack", SetLapack, METH_VARARGS,
     "set_lapack(stpqrt, dtpqrt): the capsules of "
     "scipy.linalg.cython_lapack.__pyx_capi__."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_lapack_fold",
                      "XLA FFI handlers for LAPACK ?tpqrt folds.", -1,
                      methods};

}  // namespace

PyMODINIT_FUNC PyInit__lapack_fold() { return PyModule_Create(&module); }
