// Block-sparse linear for CPUs: y = act(x @ W^T + b), W stored as block-CSR.
//
// Layout (see dipgo/kernels/layout.py): W (N, K) is cut into blocks of bn output rows x bk input
// columns. Block row j (output features j*bn .. j*bn+bn-1) keeps the blocks
// col_indices[row_ptr[j] .. row_ptr[j+1]); block b's values are stored k-major, values[b][kk][n],
// so that one k step of the micro-kernel loads a panel of contiguous weights.
//
// The micro-kernel computes an MR x (NV * VL) tile of y in registers (a "panel" of the block row's
// bn columns): per k it loads NV weight vectors, broadcasts one x value per row and does MR * NV
// fused multiply-adds. The tile shape is chosen per ISA so that the MR * NV accumulators, the NV
// weight vectors and the broadcast fit the register file without spilling:
//
//   AVX-512 (32 zmm, VL 16):  8 x 32 (16 acc + 2 w + 1 broadcast); 14 x 16 for bn = 16
//   AVX2    (16 ymm, VL  8):  6 x 16 (12 acc + 2 w + 1 broadcast), every bn cut into 16-wide panels
//
// 8 rows, not the 12 the AVX-512 registers would hold: measured on a Zen 4 (A/B, 2 threads), 8 x 32
// is 14-19 % faster on 3072->768 (0-70 % block sparsity, 256 and 2048 tokens) and within +-3 %
// elsewhere; 9-12 rows of x a multiple of 4 KB apart overflow an 8-way L1 set (rows_alias), and a
// tile's x slices of a 30-block row no longer fit L1. (12 x 32 was chosen on an earlier AVX-512 host.)
//
// (The first version used 16-float vectors everywhere; on AVX2 each became a pair of ymm registers,
// the accumulators spilled, and the kernel ran 13-27x slower than MKL: GitHub issue 14.)
// A block row wider than the panel is done panel by panel while the tile's x rows stay in L1.
// Bias and activation are applied to the registers before the single store (no second pass over
// y). Work items are (row chunk, block row) pairs, scheduled dynamically so block rows with more
// kept blocks do not stall a thread; the caller sizes row chunks so their rows of x fit in L2.
//
// Measured refinements (GitHub issue 14; timings in docs/RESULTS.md):
//  - bk = 32 is a compile-time constant in its own instantiation (the short k loops of a sparse
//    block row unroll: ~10 % at 70-90 % sparsity);
//  - when the tile's x rows alias in L1 (K a multiple of 1024 on AVX-512 tiles), the kept blocks'
//    x slices are packed contiguously per tile first (3072->768: +10-20 %);
//  - the next tile's lines of y are prefetched while a tile computes (cold y lines are read before
//    they are written; 256 tokens at 90 %: +2-11 %);
//  - a y too large to stay cached (the caller decides) is written with streaming stores, which skip
//    the read-for-ownership of every line (768->3072 at 2048 tokens, 90 %: 7.5 -> 5.5 ms);
//  - sparse weights over many row chunks copy each chunk of x once into a [block column][row][bk]
//    buffer and run all block rows from it, while the next chunk is prefetched: x is then read
//    front to back instead of in scattered 128-byte slices, each a cache miss the first time
//    (3072->768 at 2048 tokens, 90 %: +23 % on the AVX2 build, +36 % on the AVX-512 one; see
//    pack_chunks).
//
// The ISA is the compiler's target (-march=x86-64-v4 / -v3, chosen by dipgo/kernels/native.py from
// the CPU or DIPGO_KERNEL_ISA); dipgo_bsl_isa() reports what was really compiled, so a compiler that
// silently ignored the flags is caught by the loader. Plain C ABI, no torch headers: compiles in
// about a second and is called through ctypes.

#include <cstddef>
#include <cstdint>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define DIPGO_ISA 2
#define DIPGO_VL 16
#elif defined(__AVX2__) && defined(__FMA__)
#define DIPGO_ISA 1
#define DIPGO_VL 8
#else
#define DIPGO_ISA 0  // portable build: whatever the compiler makes of 8-float vectors
#define DIPGO_VL 8
#endif

constexpr int VL = DIPGO_VL;
typedef float vf __attribute__((vector_size(VL * 4)));
typedef float vf_u __attribute__((vector_size(VL * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));

static inline vf loadv(const float* p) { return *(const vf_u*)p; }
static inline void storev(float* p, vf v) { *(vf_u*)p = v; }
static inline vf splat(float s) { return (vf){} + s; }

// Tile per block height: rows MR, vectors per row NV (panel width NV * VL columns, <= bn).
#if DIPGO_ISA == 2
template <int BN> struct Tile { static constexpr int NV = BN == 16 ? 1 : 2, MR = BN == 16 ? 14 : 8; };
#elif DIPGO_ISA == 1
template <int BN> struct Tile { static constexpr int NV = 2, MR = 6; };
#else
template <int BN> struct Tile { static constexpr int NV = 2, MR = 4; };
#endif

// exp(x) for x in [-87, 0] (all gelu needs): 2^n * p(r), |r| <= ln2 / 2, relative error ~1e-7.
static inline vf exp_nonpos(vf x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  vf t = x * 1.44269504088896341f;
  vi n = __builtin_convertvector(t - 0.5f, vi);  // round half down; t <= 0 so truncation is ceil
  vf nf = __builtin_convertvector(n, vf);
  vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vi bits = (n + 127) << 23;
  return p * (vf)bits;
}

// gelu(x) = x / 2 * (1 + erf(x / sqrt 2)); erf from Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7),
// written as erfc for negative arguments so that 1 + erf(z) does not cancel.
static inline vf gelu(vf x) {
  vf z = x * 0.70710678118654752f;
  vf az = z < 0 ? -z : z;
  vf t = 1.0f / (1.0f + 0.3275911f * az);
  vf poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  vf q = poly * exp_nonpos(-az * az);  // erfc(|z|)
  vf one_plus_erf = z < 0 ? q : 2.0f - q;
  return 0.5f * x * one_plus_erf;
}

static inline vf activate(vf v, int act) {
  if (act == 1) return v > 0 ? v : (vf){};
  if (act == 2) return gelu(v);
  return v;
}

// One MR x (NV * VL) tile of y over the nb kept blocks of a block row. ``vals`` points at the
// panel's first column in block 0; ldw (= bn) is the k-row stride inside a block. Block b's x slice
// starts at x + cols[b] * cs, rows ldx apart: cs = bk for x itself, cs = rows * bk for a chunk packed
// by pack_chunk (rows bk apart); when cols is null, at x + b * MR * bk (a tile's packed copy). BK > 0 fixes bk at compile time (the common 32: the k loop
// unrolls and its bounds fold, ~10 % at high sparsity where the loop is short).
template <int MR, int NV, int BK>
static inline void micro_kernel(const float* __restrict x, int64_t ldx, const float* __restrict vals,
                                const int32_t* __restrict cols, int64_t nb, int64_t bk, int64_t ldw,
                                float* __restrict y, int64_t ldy, const float* __restrict bias, int act,
                                bool stream, int64_t cs) {
  if (BK) bk = BK;
  vf acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = (vf){};
  const int64_t block_size = bk * ldw;
  for (int64_t b = 0; b < nb; ++b) {
    const float* xp = cols ? x + (int64_t)cols[b] * cs : x + b * MR * bk;
    const float* wp = vals + b * block_size;
#pragma GCC unroll 8
    for (int64_t kk = 0; kk < bk; ++kk) {
      vf w[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) w[v] = loadv(wp + kk * ldw + v * VL);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const float s = xp[r * ldx + kk];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] += s * w[v];
      }
    }
  }
  vf bv[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) bv[v] = bias ? loadv(bias + v * VL) : (vf){};
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const vf out = activate(acc[r][v] + bv[v], act);
#if DIPGO_ISA == 2
      if (stream) { _mm512_stream_ps(y + r * ldy + v * VL, (__m512)out); continue; }
#elif DIPGO_ISA == 1
      if (stream) { _mm256_stream_ps(y + r * ldy + v * VL, (__m256)out); continue; }
#endif
      storev(y + r * ldy + v * VL, out);
    }
}

template <int MR, int NV>
static inline void micro_kernel_any_bk(const float* x, int64_t ldx, const float* vals, const int32_t* cols,
                                       int64_t nb, int64_t bk, int64_t ldw, float* y, int64_t ldy,
                                       const float* bias, int act, bool stream, int64_t cs) {
  if (bk == 32)
    micro_kernel<MR, NV, 32>(x, ldx, vals, cols, nb, bk, ldw, y, ldy, bias, act, stream, cs);
  else
    micro_kernel<MR, NV, 0>(x, ldx, vals, cols, nb, bk, ldw, y, ldy, bias, act, stream, cs);
}

// Whether the MR x rows of a tile, ldx floats apart, crowd into few sets of a 64-set, 8-way L1
// (32 KB, the x86 norm): when K is a multiple of 1024 every row starts in the same set and the
// 12-14 rows of a tall tile evict each other on every block (measured with 12-row AVX-512 tiles:
// 3072->768 ran at 0.78x of oneDNN on a dense pattern). Such tiles read a packed copy instead; of
// today's tiles only the 14 x 16 one (bn = 16) can alias.
static bool rows_alias(int64_t ldx, int mr) {
  bool seen[64] = {};
  int sets = 0;
  for (int r = 0; r < mr; ++r) {
    const int64_t set = ((int64_t)r * ldx * 4 / 64) % 64;
    if (!seen[set]) seen[set] = true, ++sets;
  }
  // a row's slice of a block covers consecutive sets, one line each: more than 8 rows per set
  // overflow the 8 ways (the 6-row AVX2 tile never does; packing it measured no faster)
  return (mr + sets - 1) / sets > 8;
}

// R rows of one block row, every panel of its BN columns (panels inner: the R x-rows stay in L1).
// With ``buf`` the R rows' slices of the kept blocks are first copied there ([block][row][bk]),
// so the panels read contiguous, non-aliasing x (see rows_alias).
template <int R, int NV, int BN>
static inline void row_tile(const float* x, int64_t ldx, const float* vals, const int32_t* cols, int64_t nb,
                            int64_t bk, float* y, int64_t ldy, const float* bias, int act, float* buf,
                            bool stream, int64_t cs) {
  constexpr int PW = NV * VL;
  static_assert(BN % PW == 0, "the panel must divide the block height");
  if (buf) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* src = x + (int64_t)cols[b] * bk;
      float* dst = buf + b * R * bk;
      for (int r = 0; r < R; ++r) {
        int64_t kk = 0;
        for (; kk + VL <= bk; kk += VL) storev(dst + r * bk + kk, loadv(src + r * ldx + kk));
        for (; kk < bk; ++kk) dst[r * bk + kk] = src[r * ldx + kk];
      }
    }
    x = buf, ldx = bk, cols = nullptr;
  }
#pragma GCC unroll 1
  for (int p = 0; p < BN; p += PW)
    micro_kernel_any_bk<R, NV>(x, ldx, vals + p, cols, nb, bk, BN, y + p, ldy, bias ? bias + p : nullptr, act,
                               stream, cs);
}

// All `rows` rows of one block row: full MR tiles, then the remainder in tiles of 8, 4, 2, 1.
template <int BN>
static void block_row(const float* x, int64_t ldx, int64_t rows, const float* vals, const int32_t* cols,
                      int64_t nb, int64_t bk, float* y, int64_t ldy, const float* bias, int act, float* buf,
                      bool stream, int64_t cs) {
  constexpr int MR = Tile<BN>::MR, NV = Tile<BN>::NV;
  for (; rows >= MR; rows -= MR, x += MR * ldx, y += MR * ldy) {
    // Ask for the next tile's lines of y (with intent to write) while this one computes: a cold y
    // line is read before it is written, and at high sparsity that read is a large part of the
    // call (Zen 4, 2 threads, 256 tokens, 90 %: +2-9 % on the AVX-512 build, +2-11 % on AVX2; built
    // with -mprfchw where the CPU has PREFETCHW, another +4-13 % at 128-256 tokens).
    if (!stream && rows >= 2 * MR)
      for (int r = 0; r < MR; ++r)
        for (int c = 0; c < BN; c += 16) __builtin_prefetch(y + (MR + r) * ldy + c, 1, 3);
    row_tile<MR, NV, BN>(x, ldx, vals, cols, nb, bk, y, ldy, bias, act, buf, stream, cs);
  }
  if (MR > 8 && rows >= 8) {
    row_tile<(MR > 8 ? 8 : 1), NV, BN>(x, ldx, vals, cols, nb, bk, y, ldy, bias, act, buf, stream, cs);
    rows -= 8, x += 8 * ldx, y += 8 * ldy;
  }
  if (MR > 4 && rows >= 4) {
    row_tile<(MR > 4 ? 4 : 1), NV, BN>(x, ldx, vals, cols, nb, bk, y, ldy, bias, act, buf, stream, cs);
    rows -= 4, x += 4 * ldx, y += 4 * ldy;
  }
  if (MR > 2 && rows >= 2) {
    row_tile<(MR > 2 ? 2 : 1), NV, BN>(x, ldx, vals, cols, nb, bk, y, ldy, bias, act, buf, stream, cs);
    rows -= 2, x += 2 * ldx, y += 2 * ldy;
  }
  for (; rows > 0; --rows, x += ldx, y += ldy) row_tile<1, NV, BN>(x, ldx, vals, cols, nb, bk, y, ldy, bias, act, buf, stream, cs);
}

// block_row for the block heights the kernel supports.
static void any_block_row(int64_t bn, const float* x, int64_t ldx, int64_t rows, const float* vals, const int32_t* cols,
                          int64_t nb, int64_t bk, float* y, int64_t ldy, const float* bias, int act, float* buf,
                          bool stream, int64_t cs) {
  if (bn == 16)
    block_row<16>(x, ldx, rows, vals, cols, nb, bk, y, ldy, bias, act, buf, stream, cs);
  else if (bn == 32)
    block_row<32>(x, ldx, rows, vals, cols, nb, bk, y, ldy, bias, act, buf, stream, cs);
  else
    block_row<64>(x, ldx, rows, vals, cols, nb, bk, y, ldy, bias, act, buf, stream, cs);
}

// Copies rows [0, rows) of x into buf as [block column][row][bk]: each block column's slice of the
// chunk becomes one contiguous rows * bk run (micro_kernel's cs = rows * bk, ldx = bk). x is read
// front to back, which the hardware prefetchers follow, instead of in the kept blocks' scattered
// 128-byte slices, each a cache miss the first time a block row asks for it.
static void pack_chunk(const float* x, int64_t ldx, int64_t rows, int64_t K, int64_t bk, float* buf) {
  const int64_t block_cols = K / bk;
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = x + r * ldx;
    for (int64_t kb = 0; kb < block_cols; ++kb) {
      float* dst = buf + (kb * rows + r) * bk;
      int64_t kk = 0;
      for (; kk + VL <= bk; kk += VL) storev(dst + kk, loadv(src + kb * bk + kk));
      for (; kk < bk; ++kk) dst[kk] = src[kb * bk + kk];
    }
  }
}

// Whether to pack whole row chunks (the loop in dipgo_bsl_forward). Measured with A/B of both
// loops in one process, 2 threads (docs/RESULTS.md). AVX2 build (Zen 3): at 2048 tokens 3072->768
// +23 % at 90 % block sparsity and +4 % at 70 %, 768->3072 +11 % / +7 %, 1536->384 at 4096 tokens
// +29 % / +14 %; at 512 tokens (x mostly cached) +-3 %. AVX-512 build (Zen 4): 3072->768 at 2048
// tokens +17 / +14 / +36 % at 60 / 70 / 90 %, at 1024 tokens +35 % at 90 %, 1536->384 at 4096
// tokens +16 % at 90 %. At 50 % the copy does not pay (0.97-0.99x, most of x is read anyway), and
// with few chunks per thread neither does it (x fits the caches): chunks >= 8 per thread means x
// is over about 12 L2s. A packed chunk's rows are bk floats apart, so the tile packing that
// aliasing rows need (rows_alias) is never wanted on this loop. The portable build keeps the
// per-item loop (never measured).
static bool pack_chunks(int64_t nnz, int64_t block_rows, int64_t block_cols, int64_t chunks, int threads) {
  if (DIPGO_ISA == 0) return false;
  const bool sparse = 20 * nnz <= 9 * block_rows * block_cols;  // density <= 45 %
  return sparse && chunks >= 8 * (int64_t)threads;
}

// Threads a call uses: waking a second one costs microseconds, not worth it below ~100k
// multiply-adds or with a single work item.
static int call_threads(int64_t T, int64_t nnz, int64_t bk, int64_t bn, int64_t items, int num_threads) {
  return num_threads > 1 && items > 1 && T * nnz * bk * bn >= 100000 ? num_threads : 1;
}

extern "C" {

// Version of this ABI; the Python loader refuses a library that reports another one.
int dipgo_bsl_abi_version(void) { return 4; }

// What this build was compiled for: 0 portable, 1 AVX2 + FMA, 2 AVX-512F.
int dipgo_bsl_isa(void) { return DIPGO_ISA; }

// Rows per micro-kernel tile for block height bn (the Python side rounds row chunks to it).
int dipgo_bsl_tile_rows(int bn) { return bn == 16 ? Tile<16>::MR : bn == 32 ? Tile<32>::MR : Tile<64>::MR; }

// Whether dipgo_bsl_forward with these arguments packs whole row chunks (1) or runs the per-item
// loop (0): tests use it to cover both loops.
int dipgo_bsl_packs_chunks(int64_t T, int64_t K, int64_t ldx, int64_t nnz, int64_t N, int64_t bn, int64_t bk,
                           int64_t row_chunk, int num_threads) {
  if ((bn != 16 && bn != 32 && bn != 64) || T <= 0 || N <= 0) return 0;
  (void)ldx;  // kept in the ABI: an earlier rule also looked at how x's rows alias
  const int64_t block_rows = N / bn, chunks = (T + row_chunk - 1) / row_chunk;
  const int threads = call_threads(T, nnz, bk, bn, block_rows * chunks, num_threads);
  return pack_chunks(nnz, block_rows, K / bk, chunks, threads);
}

// y[T, N] = act(x[T, K] @ W^T + bias). x rows are ldx floats apart, y rows ldy floats apart.
// row_ptr has N / bn + 1 entries, col_indices nnz entries in [0, K / bk). act: 0 none, 1 relu,
// 2 gelu (erf). bias may be null. Returns 0; -1 for a block height the kernel does not support;
// -2 when row_ptr / col_indices are out of range (checked before anything is read through them).
int dipgo_bsl_forward(const float* x, int64_t T, int64_t K, int64_t ldx, const float* vals, int64_t nnz,
                      const int32_t* row_ptr, const int32_t* cols, int64_t N, int64_t bn, int64_t bk,
                      const float* bias, int act, float* y, int64_t ldy, int64_t row_chunk, int num_threads,
                      int stream) {
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
  const int threads = call_threads(T, nnz, bk, bn, items, num_threads);
  const bool parallel = threads > 1;
  const int mr = bn == 16 ? Tile<16>::MR : bn == 32 ? Tile<32>::MR : Tile<64>::MR;
  const bool pack = rows_alias(ldx, mr);
  // Streaming (non-temporal) stores skip reading y's lines before writing them: worth it only for
  // a y too large to stay cached for the next layer anyway (the caller decides), and only on
  // vector-aligned rows.
#if DIPGO_ISA >= 1
  stream = stream && (uintptr_t)y % (VL * 4) == 0 && ldy % VL == 0 && bn % VL == 0;
#else
  stream = 0;
#endif
  if (pack_chunks(nnz, block_rows, block_cols, chunks, threads)) {
    // Each thread takes one contiguous run of rows (a multiple of the tile height, so the runs
    // differ by under one tile: dealing whole chunks instead left one thread a chunk more, 6-12 %
    // at 17-35 chunks), walks it chunk by chunk from a packed copy of the chunk's rows of x, and
    // asks for the next chunk to be fetched into L2 bit by bit while this one computes.
    const int64_t per = ((T + threads - 1) / threads + mr - 1) / mr * mr;
#pragma omp parallel for schedule(static, 1) num_threads(num_threads) if (parallel)
    for (int t = 0; t < threads; ++t) {
      const int64_t lo = t * per < T ? t * per : T, hi = lo + per < T ? lo + per : T;
      static thread_local std::vector<float> packed;
      for (int64_t r0 = lo; r0 < hi; r0 += row_chunk) {
        const int64_t rows = hi - r0 < row_chunk ? hi - r0 : row_chunk;
        if ((int64_t)packed.size() < rows * K) packed.resize(rows * K);
        pack_chunk(x + r0 * ldx, ldx, rows, K, bk, packed.data());
        const int64_t n0 = r0 + rows, next_rows = hi - n0 < row_chunk ? hi - n0 : row_chunk;
        for (int64_t j = 0; j < block_rows; ++j) {
          for (int64_t r = next_rows * j / block_rows; r < next_rows * (j + 1) / block_rows; ++r)
            for (int64_t k = 0; k < K; k += 16) __builtin_prefetch(x + (n0 + r) * ldx + k, 0, 2);
          const int64_t b0 = row_ptr[j], nb = row_ptr[j + 1] - b0;
          any_block_row(bn, packed.data(), bk, rows, vals + b0 * bk * bn, cols + b0, nb, bk, y + r0 * ldy + j * bn,
                        ldy, bias ? bias + j * bn : nullptr, act, nullptr, stream, rows * bk);
        }
      }
#if DIPGO_ISA >= 1
      if (stream) _mm_sfence();
#endif
    }
    return 0;
  }
  const std::size_t pack_floats = (std::size_t)block_cols * bk * mr;  // every block of one tile
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
    float* buf = nullptr;
    if (pack) {
      static thread_local std::vector<float> packed;
      if (packed.size() < pack_floats) packed.resize(pack_floats);
      buf = packed.data();
    }
    any_block_row(bn, xp, ldx, rows, vp, cols + b0, nb, bk, yp, ldy, bp, act, buf, stream, bk);
#if DIPGO_ISA >= 1
    if (stream) _mm_sfence();  // streamed stores are weakly ordered: drain this thread's before the join
#endif
  }
  return 0;
}

}  // extern "C"
