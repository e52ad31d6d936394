// Python entry point of llama_fast._C (setup.py only; C++ users link the ops without it).
// The module is empty: importing it runs the static op registrations of the other files.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
