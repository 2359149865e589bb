// Block-sparse linear for CPUs: y = act(x @ W^T + b), W stored as block-CSR.
//
// Layout (see dipgo/kernels/layout.py): W (N, K) is cut into blocks of bn output rows x bk input
// columns. Block row j (output features j*bn .. j*bn+bn-1) keeps the blocks
// col_indices[row_ptr[j] .. row_ptr[j+1]); block b's values are stored k-major, values[b][kk][n],
// so that one k step of the micro-kernel loads bn contiguous weights (bn / 16 vector loads).
//
// The micro-kernel computes an MR x bn tile of y in registers: per k it broadcasts one x value per
// row and does MR * bn / 16 fused multiply-adds. Bias and activation are applied to the
// registers before the single store (no second pass over y). Work items are (row chunk, block row)
// pairs, scheduled dynamically so block rows with more kept blocks do not stall a thread.
//
// Plain C ABI, no torch headers: compiles in about a second and is called through ctypes.
// GCC vector extensions (16 x float) become AVX-512 with -march=native where the CPU has it, or
// pairs of AVX2 instructions otherwise.

#include <cstdint>

typedef float v16f __attribute__((vector_size(64)));
typedef float v16f_u __attribute__((vector_size(64), aligned(4)));
typedef int32_t v16i __attribute__((vector_size(64)));

static inline v16f load16(const float* p) { return *(const v16f_u*)p; }
static inline void store16(float* p, v16f v) { *(v16f_u*)p = v; }
static inline v16f splat(float s) { return (v16f){} + s; }

#if defined(__AVX512F__)
// 32 vector registers: MR * bn / 16 accumulators + bn / 16 weight vectors + 1 broadcast.
#define DIPGO_MR16 14
#define DIPGO_MR32 12
#define DIPGO_MR64 6
#else
// 16 AVX2 registers, and every v16f takes two of them.
#define DIPGO_MR16 6
#define DIPGO_MR32 3
#define DIPGO_MR64 1
#endif

// exp(x) for x in [-87, 0] (all gelu needs): 2^n * p(r), |r| <= ln2 / 2, relative error ~1e-7.
static inline v16f exp_nonpos(v16f x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  v16f t = x * 1.44269504088896341f;
  v16i n = __builtin_convertvector(t - 0.5f, v16i);  // round half down; t <= 0 so truncation is ceil
  v16f nf = __builtin_convertvector(n, v16f);
  v16f r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  v16f p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  v16i bits = (n + 127) << 23;
  return p * (v16f)bits;
}

// gelu(x) = x / 2 * (1 + erf(x / sqrt 2)); erf from Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7),
// written as erfc for negative arguments so that 1 + erf(z) does not cancel.
static inline v16f gelu16(v16f x) {
  v16f z = x * 0.70710678118654752f;
  v16f az = z < 0 ? -z : z;
  v16f t = 1.0f / (1.0f + 0.3275911f * az);
  v16f poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  v16f q = poly * exp_nonpos(-az * az);  // erfc(|z|)
  v16f one_plus_erf = z < 0 ? q : 2.0f - q;
  return 0.5f * x * one_plus_erf;
}

static inline v16f activate(v16f v, int act) {
  if (act == 1) return v > 0 ? v : (v16f){};
  if (act == 2) return gelu16(v);
  return v;
}

// One MR x (16 * NV) tile of y over the nb kept blocks of a block row.
template <int MR, int NV>
static inline void micro_kernel(const float* __restrict x, int64_t ldx, const float* __restrict vals,
                                const int32_t* __restrict cols, int64_t nb, int64_t bk, float* __restrict y,
                                int64_t ldy, const float* __restrict bias, int act) {
  constexpr int BN = NV * 16;
  v16f acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = (v16f){};
  for (int64_t b = 0; b < nb; ++b) {
    const float* xp = x + (int64_t)cols[b] * bk;
    const float* wp = vals + b * bk * BN;
    for (int64_t kk = 0; kk < bk; ++kk) {
      v16f w[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) w[v] = load16(wp + kk * BN + v * 16);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const float s = xp[r * ldx + kk];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] += s * w[v];
      }
    }
  }
  v16f bv[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) bv[v] = bias ? load16(bias + v * 16) : (v16f){};
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store16(y + r * ldy + v * 16, activate(acc[r][v] + bv[v], act));
}

// All `rows` rows of one block row: full MR tiles, then the remainder in tiles of 8, 4, 2, 1.
template <int NV, int MR>
static void block_row(const float* x, int64_t ldx, int64_t rows, const float* vals, const int32_t* cols,
                      int64_t nb, int64_t bk, float* y, int64_t ldy, const float* bias, int act) {
  for (; rows >= MR; rows -= MR, x += MR * ldx, y += MR * ldy)
    micro_kernel<MR, NV>(x, ldx, vals, cols, nb, bk, y, ldy, bias, act);
  if (MR > 8 && rows >= 8) {
    micro_kernel<(MR > 8 ? 8 : 1), NV>(x, ldx, vals, cols, nb, bk, y, ldy, bias, act);
    rows -= 8, x += 8 * ldx, y += 8 * ldy;
  }
  if (MR > 4 && rows >= 4) {
    micro_kernel<(MR > 4 ? 4 : 1), NV>(x, ldx, vals, cols, nb, bk, y, ldy, bias, act);
    rows -= 4, x += 4 * ldx, y += 4 * ldy;
  }
  if (MR > 2 && rows >= 2) {
    micro_kernel<(MR > 2 ? 2 : 1), NV>(x, ldx, vals, cols, nb, bk, y, ldy, bias, act);
    rows -= 2, x += 2 * ldx, y += 2 * ldy;
  }
  for (; rows > 0; --rows, x += ldx, y += ldy) micro_kernel<1, NV>(x, ldx, vals, cols, nb, bk, y, ldy, bias, act);
}

extern "C" {

// Version of this ABI; the Python loader refuses a library that reports another one.
int dipgo_bsl_abi_version(void) { return 1; }

// Rows per micro-kernel tile for block height bn (the Python side rounds row chunks to it).
int dipgo_bsl_tile_rows(int bn) { return bn == 16 ? DIPGO_MR16 : bn == 32 ? DIPGO_MR32 : DIPGO_MR64; }

// y[T, N] = act(x[T, K] @ W^T + bias). x rows are ldx floats apart, y rows ldy floats apart.
// row_ptr has N / bn + 1 entries, col_indices nnz entries in [0, K / bk). act: 0 none, 1 relu,
// 2 gelu (erf). bias may be null. Returns 0; -1 for a block height the kernel does not support;
// -2 when row_ptr / col_indices are out of range (checked before anything is read through them).
int dipgo_bsl_forward(const float* x, int64_t T, int64_t K, int64_t ldx, const float* vals, int64_t nnz,
                      const int32_t* row_ptr, const int32_t* cols, int64_t N, int64_t bn, int64_t bk,
                      const float* bias, int act, float* y, int64_t ldy, int64_t row_chunk, int num_threads) {
  if (bn != 16 && bn != 32 && bn != 64) return -1;
  const int64_t block_rows = N / bn, block_cols = K / bk;
  if (row_ptr[0] != 0 || row_ptr[block_rows] != nnz) return -2;
  for (int64_t j = 0; j < block_rows; ++j)
    if (row_ptr[j + 1] < row_ptr[j]) return -2;
  for (int64_t b = 0; b < nnz; ++b)
    if (cols[b] < 0 || cols[b] >= block_cols) return -2;
  if (T <= 0 || N <= 0) return 0;
  const int64_t chunks = (T + row_chunk - 1) / row_chunk;
  const int64_t items = block_rows * chunks;
  // Waking a second thread costs microseconds: not worth it below ~100k multiply-adds.
  const bool parallel = num_threads > 1 && items > 1 && T * nnz * bk * bn >= 100000;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (parallel)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t c = item / block_rows, j = item % block_rows;
    const int64_t r0 = c * row_chunk;
    const int64_t rows = T - r0 < row_chunk ? T - r0 : row_chunk;
    const int64_t b0 = row_ptr[j], nb = row_ptr[j + 1] - b0;
    const float* bp = bias ? bias + j * bn : nullptr;
    const float* vp = vals + b0 * bk * bn;
    const float* xp = x + r0 * ldx;
    float* yp = y + r0 * ldy + j * bn;
    if (bn == 16)
      block_row<1, DIPGO_MR16>(xp, ldx, rows, vp, cols + b0, nb, bk, yp, ldy, bp, act);
    else if (bn == 32)
      block_row<2, DIPGO_MR32>(xp, ldx, rows, vp, cols + b0, nb, bk, yp, ldy, bp, act);
    else
      block_row<4, DIPGO_MR64>(xp, ldx, rows, vp, cols + b0, nb, bk, yp, ldy, bp, act);
  }
  return 0;
}

}  // extern "C"
