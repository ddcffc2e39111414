// The Python module effvit._C. Importing it loads the library, whose static initialisers register
// every op with the dispatcher (csrc/effvit_ops.cpp and the per-device kernel files). It also answers
// a few questions about the build that the op schemas cannot.
#include <Python.h>

#include "cpu/cpu_isa.h"

namespace {

PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(effvit::cpu::cpu_isa_name(effvit::cpu::cpu_isa()));
}

PyObject* cpu_isa_supported(PyObject*, PyObject*) {
  return PyUnicode_FromString(effvit::cpu::cpu_isa_name(effvit::cpu::cpu_isa_supported()));
}

PyObject* compiled_cpu_isas(PyObject*, PyObject*) {
  return PyUnicode_FromString(effvit::cpu::compiled_cpu_isas());
}

PyObject* has_cuda(PyObject*, PyObject*) {
#ifdef EFFVIT_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "CPU instruction set the kernels use in this process."},
    {"cpu_isa_supported", cpu_isa_supported, METH_NOARGS, "Best CPU instruction set this CPU supports."},
    {"compiled_cpu_isas", compiled_cpu_isas, METH_NOARGS, "CPU instruction sets compiled into the library."},
    {"has_cuda", has_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "effvit compiled kernels", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
