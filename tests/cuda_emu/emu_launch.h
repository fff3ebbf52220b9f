// `kernel<<<grid, block, smem, stream>>>(args);` is rewritten by build.py to
// `emu_launch_([&] { kernel(args); }, grid, block, smem, stream);`: every emulated thread runs the lambda.
#pragma once
namespace emu {
void launch(dim3 grid, dim3 block, size_t smem, std::function<void()> body);
}
template <class F, class G, class B>
void emu_launch_(F f, G grid, B block, size_t smem = 0, cudaStream_t = nullptr) {
  emu::launch(dim3(grid), dim3(block), smem, f);
}
