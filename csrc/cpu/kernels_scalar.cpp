// Kernels for any CPU (baseline instruction set; also the only path on non-x86 builds).
#define DYNATTN_ISA_NS scalar
#define DYNATTN_ISA_NAME "scalar"
#define DYNATTN_ISA_TABLE kernels_scalar
#include "cpu/kernels_impl.h"
