// The Python module fastnorm._C. It carries no Python functions: importing it runs the static
// TORCH_LIBRARY_IMPL(fastnorm, CUDA, ...) blocks of the .cu files, which register the CUDA kernels
// under the op schemas that fastnorm/ops/ defines.
#include <Python.h>

static struct PyModuleDef fastnorm_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "fastnorm CUDA kernels (registered as torch ops)", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastnorm_c_module); }
