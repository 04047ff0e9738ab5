// The CUDA kernels' translation unit, compiled for the CPU emulator (build.py puts the rewritten
// csrc/cuda sources next to this file).
#include "emu.h"
#include "tt_kernels.cu"
