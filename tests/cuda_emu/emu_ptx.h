// Replacement for the "PTX wrappers" section of device.cuh (included there by build.py, inside namespace
// dynattn::cuda). Same signatures.

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(reinterpret_cast<uintptr_t>(p));  // unused by the emulation
}

__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool fill) {
  emu::cp_async(dst, src, 16, fill ? 16 : 0);
}
__device__ __forceinline__ void cp_async_4(void* dst, const void* src, bool fill) {
  emu::cp_async(dst, src, 4, fill ? 4 : 0);
}
__device__ __forceinline__ void cp_async_commit() { emu::cp_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  emu::cp_wait(N);
}

// ldmatrix .x4: lanes 8i..8i+7 give the row addresses of matrix i (16 bytes each). Without .trans, lane l
// receives in register i the elements (row l/4, cols 2(l%4), 2(l%4)+1) of matrix i; with .trans, elements
// (rows 2(l%4), 2(l%4)+1; col l/4).
inline void emu_ldsm(uint32_t (&r)[4], const void* p, bool trans) {
  emu::check_smem(p, 16, "ldmatrix row");
  if (reinterpret_cast<uintptr_t>(p) % 16) emu::fail("ldmatrix row address not 16-byte aligned");
  const int t = emu::cur_thread();
  const int w = t / 32, l = t % 32;
  emu::Slot* s = emu::slots();
  s[t].v[0] = reinterpret_cast<uint64_t>(p);
  emu::warp_barrier();
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (!trans) {
      const uint16_t* row = reinterpret_cast<const uint16_t*>(s[w * 32 + 8 * i + l / 4].v[0]);
      lo = row[2 * (l % 4)];
      hi = row[2 * (l % 4) + 1];
    } else {
      const uint16_t* r0 = reinterpret_cast<const uint16_t*>(s[w * 32 + 8 * i + 2 * (l % 4)].v[0]);
      const uint16_t* r1 = reinterpret_cast<const uint16_t*>(s[w * 32 + 8 * i + 2 * (l % 4) + 1].v[0]);
      lo = r0[l / 4];
      hi = r1[l / 4];
    }
    r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  emu::warp_barrier();
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) { emu_ldsm(r, p, false); }
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) { emu_ldsm(r, p, true); }

inline float emu_h2f(uint16_t u, bool bf16) {
  if (bf16) {
    uint32_t x = static_cast<uint32_t>(u) << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
  }
  __half h;
  memcpy(&h, &u, 2);
  return __half2float(h);
}

// mma.m16n8k16 row.col, f32 accumulate. Fragments (g = l/4, t = l%4):
//   A reg j: rows g + 8*(j&1), cols 2t + 8*(j>>1) + {0,1}
//   B reg j: rows(k) 2t + 8*j + {0,1}, col g
//   C: (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)
inline void emu_mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  const int t = emu::cur_thread();
  const int w = t / 32, l = t % 32;
  emu::Slot* s = emu::slots();
  for (int j = 0; j < 4; ++j) s[t].v[j] = a[j];
  s[t].v[4] = b0;
  s[t].v[5] = b1;
  emu::warp_barrier();
  auto A = [&](int m, int k) {
    const int lane = (m % 8) * 4 + (k % 8) / 2;
    const int reg = (m >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    const uint32_t u = static_cast<uint32_t>(s[w * 32 + lane].v[reg]);
    return emu_h2f(static_cast<uint16_t>((k % 2) ? (u >> 16) : (u & 0xffff)), bf16);
  };
  auto B = [&](int k, int n) {
    const int lane = n * 4 + (k % 8) / 2;
    const int reg = 4 + (k >= 8 ? 1 : 0);
    const uint32_t u = static_cast<uint32_t>(s[w * 32 + lane].v[reg]);
    return emu_h2f(static_cast<uint16_t>((k % 2) ? (u >> 16) : (u & 0xffff)), bf16);
  };
  const int g = l / 4, tt = l % 4;
  float d[4];
  for (int e = 0; e < 4; ++e) {
    const int m = g + 8 * (e / 2), n = 2 * tt + (e % 2);
    float acc = c[e];
    for (int k = 0; k < 16; ++k) acc += A(m, k) * B(k, n);
    d[e] = acc;
  }
  emu::warp_barrier();
  for (int e = 0; e < 4; ++e) c[e] = d[e];
}

template <typename T>
struct Mma;

template <>
struct Mma<__half> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    emu_mma(c, a, b0, b1, false);
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, sizeof(u));
    return u;
  }
};

template <>
struct Mma<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    emu_mma(c, a, b0, b1, true);
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, sizeof(u));
    return u;
  }
};
