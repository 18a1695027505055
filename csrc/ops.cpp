// TORCH_LIBRARY schemas, input checks and backend registrations for fused_pos_attn._C.
// This version registers only `build_info`, which reports what the extension was built with; the
// attention ops land with the native CPU / CUDA kernels.
#include <torch/extension.h>

#include <string>

namespace fused_pos_attn {

std::string build_info() {
#ifdef FUSED_POS_ATTN_WITH_CUDA
  return "cpu+cuda";
#else
  return "cpu";
#endif
}

}  // namespace fused_pos_attn

TORCH_LIBRARY(fused_pos_attn, m) {
  m.def("build_info() -> str", &fused_pos_attn::build_info);
}

// Empty Python module so `import fused_pos_attn._C` loads the library and runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
