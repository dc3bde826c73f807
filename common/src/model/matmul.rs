//! Matrix products for the training and inference paths. On the CPU in f32 they call the `gemm` crate (the
//! one candle's own `matmul` calls) as candle custom ops, to get the two things `matmul` lacks:
//!
//! - `matmul`: the output is not zero-filled before the product overwrites it (candle's CPU
//!   matmul memsets every output, serially on the calling thread);
//! - `matmul_acc`: `C += α·A·B` into an existing output, so `y = xWᵀ + s·(hBᵀ)` or
//!   `dx = dq·Wq + dk·Wk + dv·Wv` need no separate add passes and no temporaries.
//!
//! Operands may have any strides (a transposed view is not copied). Other devices and dtypes
//! take candle's `matmul` and tensor adds, with the same results.

use super::ops::is_cpu_f32;
use candle_core::{CpuStorage, CustomOp2, InplaceOp3, Layout, Result, Shape, Tensor};

/// A strided 2-D f32 operand inside a CPU storage.
#[derive(Clone, Copy)]
struct Operand<'a> {
    data: &'a [f32],
    offset: usize,
    rows: usize,
    cols: usize,
    rs: isize,
    cs: isize,
}

fn operand<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<Operand<'a>> {
    let (batch, offsets, op) = batched(s, l, what)?;
    if !batch.is_empty() || offsets.len() != 1 {
        candle_core::bail!("gemm: {what} must be 2-D, got {:?}", l.dims());
    }
    Ok(op)
}

/// An operand `[..batch, rows, cols]`: its batch dims, the storage offset of each matrix (in
/// row-major batch order) and the matrix (at the first offset). Every matrix is bounds-checked.
fn batched<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> Result<(Vec<usize>, Vec<usize>, Operand<'a>)> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("gemm: {what} is not f32"),
    };
    let (dims, stride) = (l.dims(), l.stride());
    let r = dims.len();
    if r < 2 {
        candle_core::bail!("gemm: {what} must be at least 2-D, got {dims:?}");
    }
    let (rows, cols) = (dims[r - 2], dims[r - 1]);
    let mut offsets = vec![l.start_offset()];
    for (&d, &st) in dims[..r - 2].iter().zip(&stride[..r - 2]) {
        offsets = offsets
            .iter()
            .flat_map(|&o| (0..d).map(move |i| o + i * st))
            .collect();
    }
    let span = (rows.max(1) - 1) * stride[r - 2] + (cols.max(1) - 1) * stride[r - 1];
    if rows > 0 && cols > 0 && offsets.iter().any(|&o| o + span >= data.len()) {
        candle_core::bail!("gemm: {what} layout exceeds its storage");
    }
    let op = Operand {
        data,
        offset: offsets.first().copied().unwrap_or(0),
        rows,
        cols,
        rs: stride[r - 2] as isize,
        cs: stride[r - 1] as isize,
    };
    Ok((dims[..r - 2].to_vec(), offsets, op))
}

fn parallelism() -> gemm::Parallelism {
    match candle_core::utils::get_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// `dst = alpha·a·b` (`accumulate = false`: dst need not be initialised) or `dst += alpha·a·b`.
/// `dst` is a contiguous row-major `[a.rows, b.cols]` buffer.
///
/// # Safety
/// `dst` must be valid for writes of `a.rows * b.cols` f32 values and must not overlap `a` or
/// `b`; operands are bounds-checked by `operand`.
unsafe fn run(dst: *mut f32, a: &Operand, b: &Operand, accumulate: bool, alpha: f32) {
    if a.rows == 1 && b.cols >= GEMV_SPLIT_MIN_COLS && b.cs > 0 && get_threads() > 1 {
        return run_row(dst, a, b, accumulate, alpha);
    }
    run_with(dst, a, b, accumulate, alpha, parallelism())
}

/// Columns below which a one-row product stays on one thread.
const GEMV_SPLIT_MIN_COLS: usize = 256;

fn get_threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// A destination pointer shared by the parallel column blocks (each writes its own columns).
#[derive(Clone, Copy)]
struct Dst(*mut f32);
// SAFETY: the blocks write disjoint column ranges of one row.
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

impl Dst {
    /// The pointer (a method, so that closures capture the whole `Dst`, which is `Sync`).
    fn ptr(&self) -> *mut f32 {
        self.0
    }
}

/// `[1, k]·[k, n]`, the product of decoding one token: the gemm crate runs it as a GEMV on one
/// thread, so the columns are split into blocks run in parallel, each a GEMV of its own.
///
/// # Safety
/// As `run`.
unsafe fn run_row(dst: *mut f32, a: &Operand, b: &Operand, accumulate: bool, alpha: f32) {
    use rayon::prelude::*;
    let n = b.cols;
    let block = n.div_ceil(4 * get_threads()).max(64);
    let dst = Dst(dst);
    (0..n.div_ceil(block)).into_par_iter().for_each(|i| {
        let (j0, j1) = (i * block, ((i + 1) * block).min(n));
        let sub = Operand {
            offset: b.offset + j0 * b.cs as usize,
            cols: j1 - j0,
            ..*b
        };
        let d = dst;
        // SAFETY: columns j0..j1 of the one destination row, inside it
        unsafe {
            run_with(
                d.0.add(j0),
                a,
                &sub,
                accumulate,
                alpha,
                gemm::Parallelism::None,
            )
        };
    });
}

/// `run` with a given parallelism.
///
/// # Safety
/// As `run`.
unsafe fn run_with(
    dst: *mut f32,
    a: &Operand,
    b: &Operand,
    accumulate: bool,
    alpha: f32,
    parallelism: gemm::Parallelism,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if k == 0 {
        if !accumulate {
            std::ptr::write_bytes(dst, 0, m * n);
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        n as isize,
        accumulate,
        a.data.as_ptr().add(a.offset),
        a.cs,
        a.rs,
        b.data.as_ptr().add(b.offset),
        b.cs,
        b.rs,
        1.0,
        alpha,
        false,
        false,
        false,
        parallelism,
    );
}

struct MatMul;

impl CustomOp2 for MatMul {
    fn name(&self) -> &'static str {
        "dialora-matmul"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (ba, oa, mut a) = batched(s1, l1, "lhs")?;
        let (bb, ob, mut b) = batched(s2, l2, "rhs")?;
        if a.cols != b.rows || ba != bb {
            candle_core::bail!("matmul: {:?} x {:?}", l1.dims(), l2.dims());
        }
        let (m, n) = (a.rows, b.cols);
        let len = oa.len() * m * n;
        let mut out: Vec<f32> = Vec::with_capacity(len);
        // SAFETY: `out` has capacity `len`; `run` writes each of the batch's `m * n` blocks
        // before `set_len`.
        unsafe {
            for (i, (&x, &y)) in oa.iter().zip(&ob).enumerate() {
                (a.offset, b.offset) = (x, y);
                run(out.as_mut_ptr().add(i * m * n), &a, &b, false, 1.0);
            }
            out.set_len(len);
        }
        let mut shape = ba;
        shape.extend([m, n]);
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

struct MatMulAcc {
    alpha: f32,
}

impl InplaceOp3 for MatMulAcc {
    fn name(&self) -> &'static str {
        "dialora-matmul-acc"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (a, b) = (operand(s1, l1, "lhs")?, operand(s2, l2, "rhs")?);
        let (m, n) = (a.rows, b.cols);
        let off = dst_l.start_offset();
        let CpuStorage::F32(d) = dst else {
            candle_core::bail!("matmul_acc: accumulator is not f32");
        };
        if a.cols != b.rows || dst_l.dims() != [m, n] || !dst_l.is_contiguous() {
            candle_core::bail!(
                "matmul_acc: {:?} += [{}, {}] x [{}, {}]",
                dst_l.dims(),
                a.rows,
                a.cols,
                b.rows,
                b.cols
            );
        }
        if off + m * n > d.len() {
            candle_core::bail!("matmul_acc: accumulator layout exceeds its storage");
        }
        // SAFETY: bounds checked above; the accumulator is a distinct storage (candle's in-place
        // op takes it mutably while the sources are borrowed).
        unsafe { run(d.as_mut_ptr().add(off), &a, &b, true, self.alpha) };
        Ok(())
    }
}

/// `a·b` for 2-D tensors, or batched `[..batch, m, k]·[..batch, k, n]` with equal batch dims
/// (any strides).
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if is_cpu_f32(a) && is_cpu_f32(b) && a.rank() >= 2 && a.rank() == b.rank() {
        a.apply_op2_no_bwd(b, &MatMul)
    } else {
        a.matmul(b)
    }
}

/// `acc + alpha·a·b`. On the CPU in f32 `acc` is updated in place and returned, so it must own
/// its storage: pass a fresh result (of `matmul`, say), never a view or a clone of a tensor
/// that is still used.
pub fn matmul_acc(acc: Tensor, a: &Tensor, b: &Tensor, alpha: f64) -> Result<Tensor> {
    let two_d = |t: &Tensor| is_cpu_f32(t) && t.rank() == 2;
    if two_d(&acc) && two_d(a) && two_d(b) && acc.is_contiguous() {
        acc.inplace_op3(
            a,
            b,
            &MatMulAcc {
                alpha: alpha as f32,
            },
        )?;
        Ok(acc)
    } else {
        let p = a.matmul(b)?;
        let p = if alpha == 1.0 { p } else { (p * alpha)? };
        acc + p
    }
}

/// A weight element the row kernel reads, and the form its input rows take: f32 weights, or
/// bf16 widened to f32 as they are read, against f32 inputs; or q8_0 blocks of candle's
/// quantized type against input rows quantized to Q8_0 by candle too (`quantize_rows`), the
/// q8_0 × q8_0 product of llama.cpp and candle's `QMatMul`: exact integer sums per block, then
/// scaled and summed in f32. Either way each output is a sequence of operations fixed by `k`
/// alone, whatever the other rows.
pub(crate) trait WeightElem: Copy + Send + Sync {
    /// An element of an input row.
    type Input: Copy + Send + Sync;
    /// Weights (and input values) per element.
    const SPAN: usize = 1;
    /// Whether the weight rows are stored in triples, the elements of a triple's three rows
    /// interleaved (`Q8Rows`): one stream from memory instead of three.
    const TRIPLES: bool = false;
    /// The dot products of `R` input rows with `C` weight rows, all of one length: element `b`
    /// of weight row `j` is `ws[j][b * stride]` (`stride` is 1 unless the rows are triples).
    fn dots<const R: usize, const C: usize>(
        xs: &[&[Self::Input]; R],
        ws: &[&[Self]; C],
        stride: usize,
    ) -> [[f32; C]; R];
}

impl WeightElem for f32 {
    type Input = f32;
    #[inline(always)]
    fn dots<const R: usize, const C: usize>(
        xs: &[&[f32]; R],
        ws: &[&[Self]; C],
        _stride: usize,
    ) -> [[f32; C]; R] {
        #[cfg(target_arch = "x86_64")]
        if simd() >= Simd::Avx2 {
            // SAFETY: AVX2 and FMA were detected; every row is k long (`rows_kernel`)
            return unsafe { avx::dots_f32(xs, ws) };
        }
        dots_plain(xs, ws, |row, i| row[i])
    }
}

impl WeightElem for half::bf16 {
    type Input = f32;
    #[inline(always)]
    fn dots<const R: usize, const C: usize>(
        xs: &[&[f32]; R],
        ws: &[&[Self]; C],
        _stride: usize,
    ) -> [[f32; C]; R] {
        #[cfg(target_arch = "x86_64")]
        if simd() >= Simd::Avx2 {
            // SAFETY: as for f32
            return unsafe { avx::dots_bf16(xs, ws) };
        }
        dots_plain(xs, ws, |row, i| {
            f32::from_bits((row[i].to_bits() as u32) << 16)
        })
    }
}

/// One block of candle's `Q8_0` (`k_quants::BlockQ8_0`, the same `repr(C)` layout): 32 values
/// `d · qs[i]`.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct BlockQ8 {
    pub d: half::f16,
    pub qs: [i8; 32],
}

const _: () = assert!(
    std::mem::size_of::<BlockQ8>()
        == std::mem::size_of::<candle_core::quantized::k_quants::BlockQ8_0>()
        && std::mem::align_of::<BlockQ8>()
            == std::mem::align_of::<candle_core::quantized::k_quants::BlockQ8_0>()
);

impl WeightElem for BlockQ8 {
    type Input = BlockQ8;
    const SPAN: usize = 32;
    const TRIPLES: bool = true;
    #[inline(always)]
    fn dots<const R: usize, const C: usize>(
        xs: &[&[BlockQ8]; R],
        ws: &[&[Self]; C],
        stride: usize,
    ) -> [[f32; C]; R] {
        dots_q8_with(simd(), xs, ws, stride)
    }
}

/// The instruction sets the kernels can use here, in order.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(crate) enum Simd {
    Plain,
    /// AVX2, FMA and F16C.
    Avx2,
    /// Those and AVX-512 VNNI (with VL): the q8_0 sums by `vpdpbusd`.
    Vnni,
}

pub(crate) fn simd() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        static SIMD: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
        *SIMD.get_or_init(|| {
            if !(has!("avx2") && has!("fma") && has!("f16c")) {
                Simd::Plain
            } else if has!("avx512f") && has!("avx512vl") && has!("avx512vnni") {
                Simd::Vnni
            } else {
                Simd::Avx2
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    Simd::Plain
}

/// The q8_0 × q8_0 dot products with the instructions of `level` (at most `simd()`): the same
/// bits whichever, since each block's 8 lane sums are exact integers and what follows is the
/// same f32 operations in the same order.
#[inline(always)]
pub(crate) fn dots_q8_with<const R: usize, const C: usize>(
    level: Simd,
    xs: &[&[BlockQ8]; R],
    ws: &[&[BlockQ8]; C],
    stride: usize,
) -> [[f32; C]; R] {
    assert!(level <= simd(), "{level:?} is not available here");
    let blocks = xs[0].len();
    assert!(
        blocks == 0
            || (xs.iter().all(|x| x.len() == blocks)
                && ws.iter().all(|w| w.len() > (blocks - 1) * stride)),
        "q8_0 rows of unequal lengths"
    );
    // SAFETY: the level's instructions were detected (asserted above); every row has the
    // same number of blocks (`rows_kernel`)
    #[cfg(target_arch = "x86_64")]
    match level {
        Simd::Vnni => return unsafe { avx::dots_q8_vnni(xs, ws, stride) },
        Simd::Avx2 => return unsafe { avx::dots_q8(xs, ws, stride) },
        Simd::Plain => {}
    }
    dots_q8_plain(xs, ws, stride)
}

/// `x` (`[m, k]`, `k` a multiple of 32) quantized row by row to Q8_0 by candle
/// (`BlockQ8_0::from_float`, what its `QMatMul` and llama.cpp do to the input of a q8_0 product).
pub(crate) fn quantize_rows(x: &[f32], k: usize) -> Vec<BlockQ8> {
    use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType};
    let mut q = vec![BlockQ8_0::zeros(); x.len() / 32];
    for (x, q) in x.chunks_exact(k).zip(q.chunks_exact_mut(k / 32)) {
        BlockQ8_0::from_float(x, q);
    }
    // SAFETY: both types are `repr(C)` { f16, [i8; 32] } of one size and alignment (asserted
    // above; `quantized_rows_are_candles_blocks` checks the bytes against candle's own)
    q.iter()
        .map(|b| unsafe { std::ptr::read(b as *const BlockQ8_0 as *const BlockQ8) })
        .collect()
}

/// Lanes of a dot product's accumulator. Every output `dot(x_i, w_j)` is summed the same way,
/// whichever block computes it: lane by lane over the length rounded down to a multiple of
/// `LANES`, then the lanes in a fixed order, then the tail in order. That order depends on the
/// length alone, so a row's results are the same computed alone or among others.
const LANES: usize = 8;

/// The lanes summed as `avx::hsum` sums them: (0+4, 1+5, 2+6, 3+7), then (0+2, 1+3), then 0+1.
fn hsum_plain(acc: &[f32; LANES]) -> f32 {
    let q = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (q[0] + q[2]) + (q[1] + q[3])
}

/// The dot products with AVX2 + FMA intrinsics: `R` input rows against `C` weight rows, an
/// 8-lane accumulator each (12 of them at 4 × 3, with the loads, the 16 registers).
#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_f32(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_bf16(p: *const half::bf16) -> __m256 {
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }

    /// The lanes of `v` summed: (0+4, 1+5, 2+6, 3+7), then (0+2, 1+3), then 0+1.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
        _mm_cvtss_f32(q)
    }

    macro_rules! dots {
        ($name:ident, $W:ty, $load:ident, $value:expr) => {
            /// # Safety
            /// AVX2 and FMA; every row of `xs` and `ws` the same length.
            #[target_feature(enable = "avx2,fma")]
            pub(super) unsafe fn $name<const R: usize, const C: usize>(
                xs: &[&[f32]; R],
                ws: &[&[$W]; C],
            ) -> [[f32; C]; R] {
                let k = xs[0].len();
                let n = k / 8 * 8;
                let mut acc = [[_mm256_setzero_ps(); C]; R];
                let mut c = 0;
                while c < n {
                    let mut w = [_mm256_setzero_ps(); C];
                    for j in 0..C {
                        w[j] = $load(ws[j].as_ptr().add(c));
                    }
                    for r in 0..R {
                        let x = _mm256_loadu_ps(xs[r].as_ptr().add(c));
                        for j in 0..C {
                            acc[r][j] = _mm256_fmadd_ps(x, w[j], acc[r][j]);
                        }
                    }
                    c += 8;
                }
                let value: fn(&[$W], usize) -> f32 = $value;
                let mut out = [[0f32; C]; R];
                for r in 0..R {
                    for j in 0..C {
                        let mut t = hsum(acc[r][j]);
                        for i in n..k {
                            t = xs[r][i].mul_add(value(ws[j], i), t);
                        }
                        out[r][j] = t;
                    }
                }
                out
            }
        };
    }
    dots!(dots_f32, f32, load_f32, |row, i| row[i]);
    dots!(dots_bf16, half::bf16, load_bf16, |row, i| {
        f32::from_bits((row[i].to_bits() as u32) << 16)
    });

    /// A block's f16 scale widened by F16C and broadcast.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scale(b: &super::BlockQ8) -> __m256 {
        _mm256_cvtph_ps(_mm_set1_epi16(b.d.to_bits() as i16))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load_qs(b: &super::BlockQ8) -> __m256i {
        _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i)
    }

    /// The q8_0 × q8_0 products by blocks: 8 exact i32 lane sums (4 bytes each) of a block
    /// pair, given by `$lanes`, then `acc += f32(lanes) · (d_w · d_x)` and the lanes summed.
    macro_rules! dots_q8 {
        ($name:ident, $features:literal, $prep:ident, $lanes:ident) => {
            /// # Safety
            /// The features named; every row of `xs` the same number of blocks, and every row
            /// of `ws` that many at `stride`.
            // the block index addresses several rows at once
            #[allow(clippy::needless_range_loop)]
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<const R: usize, const C: usize>(
                xs: &[&[super::BlockQ8]; R],
                ws: &[&[super::BlockQ8]; C],
                stride: usize,
            ) -> [[f32; C]; R] {
                let blocks = xs[0].len();
                let mut acc = [[_mm256_setzero_ps(); C]; R];
                for b in 0..blocks {
                    let mut w = [(_mm256_setzero_si256(), _mm256_setzero_si256()); C];
                    let mut dw = [_mm256_setzero_ps(); C];
                    for j in 0..C {
                        let wb = ws[j].get_unchecked(b * stride);
                        w[j] = $prep(load_qs(wb));
                        dw[j] = scale(wb);
                    }
                    for r in 0..R {
                        let xb = xs[r].get_unchecked(b);
                        let x = load_qs(xb);
                        let dx = scale(xb);
                        for j in 0..C {
                            let s = _mm256_cvtepi32_ps($lanes(x, w[j]));
                            acc[r][j] = _mm256_fmadd_ps(s, _mm256_mul_ps(dw[j], dx), acc[r][j]);
                        }
                    }
                }
                let mut out = [[0f32; C]; R];
                for r in 0..R {
                    for j in 0..C {
                        out[r][j] = hsum(acc[r][j]);
                    }
                }
                out
            }
        };
    }

    /// AVX2: the weights' magnitudes (u8) and signs (`maddubs` multiplies u8 by i8 and adds
    /// pairs into i16: |w| ≤ 128 and |x| ≤ 127, so a pair cannot saturate).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn prep_avx2(w: __m256i) -> (__m256i, __m256i) {
        (_mm256_sign_epi8(w, w), w)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn lanes_avx2(x: __m256i, (wabs, w): (__m256i, __m256i)) -> __m256i {
        let p = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(x, w));
        _mm256_madd_epi16(p, _mm256_set1_epi16(1))
    }

    dots_q8!(dots_q8, "avx2,fma,f16c", prep_avx2, lanes_avx2);

    /// VNNI: `vpdpbusd` multiplies u8 by i8 and adds fours into i32. The input's bytes are
    /// offset by 128 to make them unsigned, and each sum starts at −128·(the weights' lane
    /// sums): (x + 128)·w − 128·w = x·w, exactly.
    #[inline]
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    unsafe fn prep_vnni(w: __m256i) -> (__m256i, __m256i) {
        let z = _mm256_setzero_si256();
        let bias = _mm256_dpbusd_epi32(z, _mm256_set1_epi8(-128), w);
        (_mm256_sub_epi32(z, bias), w)
    }

    #[inline]
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    unsafe fn lanes_vnni(x: __m256i, (start, w): (__m256i, __m256i)) -> __m256i {
        _mm256_dpbusd_epi32(start, _mm256_xor_si256(x, _mm256_set1_epi8(-128)), w)
    }

    dots_q8!(
        dots_q8_vnni,
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        prep_vnni,
        lanes_vnni
    );
}

/// The q8_0 × q8_0 dot products without SIMD: the same lanes, sums and order as `avx`'s.
// one index addresses an input row and a weight row together
#[allow(clippy::needless_range_loop)]
fn dots_q8_plain<const R: usize, const C: usize>(
    xs: &[&[BlockQ8]; R],
    ws: &[&[BlockQ8]; C],
    stride: usize,
) -> [[f32; C]; R] {
    let mut out = [[0f32; C]; R];
    for r in 0..R {
        for j in 0..C {
            let mut acc = [0f32; LANES];
            for (x, w) in xs[r].iter().zip(ws[j].iter().step_by(stride)) {
                let d = w.d.to_f32() * x.d.to_f32();
                for (l, a) in acc.iter_mut().enumerate() {
                    let s: i32 = (4 * l..4 * l + 4)
                        .map(|i| x.qs[i] as i32 * w.qs[i] as i32)
                        .sum();
                    *a = (s as f32).mul_add(d, *a);
                }
            }
            out[r][j] = hsum_plain(&acc);
        }
    }
    out
}

/// The same dot products without AVX2/FMA (another machine's order, the same on that machine
/// for every block shape).
// one index addresses an input row and a weight row together
#[allow(clippy::needless_range_loop)]
fn dots_plain<W: Copy, const R: usize, const C: usize>(
    xs: &[&[f32]; R],
    ws: &[&[W]; C],
    value: impl Fn(&[W], usize) -> f32,
) -> [[f32; C]; R] {
    let k = xs[0].len();
    let n = k / LANES * LANES;
    let mut out = [[0f32; C]; R];
    for r in 0..R {
        for j in 0..C {
            let mut acc = [0f32; LANES];
            for i in 0..n {
                acc[i % LANES] += xs[r][i] * value(ws[j], i);
            }
            let mut t = hsum_plain(&acc);
            for i in n..k {
                t += xs[r][i] * value(ws[j], i);
            }
            out[r][j] = t;
        }
    }
    out
}

/// `dst[i·n + j] = alpha·dot(x_i, w_j)` (`+=` with `accumulate`) for the `m` rows of `x`
/// (`[m, k]`) and the `n` rows of `w` (`[n, k]`), both contiguous. Blocks of weight rows run in
/// parallel; each weight row is read from memory once for all of `x`'s rows, three weight rows
/// against four input rows at a time. With `W::TRIPLES`, `w` holds rows `3t..3t + 3` as one
/// triple of interleaved elements (`Q8Rows::from_qtensor`), and the last `n % 3` rows plain.
fn rows_kernel<W: WeightElem>(
    x: &[W::Input],
    w: &[W],
    (m, k, n): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    alpha: f32,
) {
    use rayon::prelude::*;
    let threads = get_threads().max(1);
    let block = (n.div_ceil(4 * threads).clamp(24, 1536)).div_ceil(3) * 3;
    let out = Dst(dst.as_mut_ptr());
    let kb = k / W::SPAN;
    let row = |i: usize| &x[i * kb..(i + 1) * kb];
    let wrow = |j: usize| &w[j * kb..(j + 1) * kb];
    let run_block = |bi: usize| {
        let put = |i: usize, j: usize, v: f32| {
            let v = alpha * v;
            // SAFETY: (i, j) is inside the m × n destination; each j belongs to one block
            unsafe {
                let p = out.ptr().add(i * n + j);
                *p = if accumulate { *p + v } else { v };
            }
        };
        let end = ((bi + 1) * block).min(n);
        let mut j = bi * block;
        while j < end {
            if j + 3 <= end {
                // blocks start at multiples of 3, so j is the first row of a triple
                let (ws, stride) = if W::TRIPLES {
                    let t = &w[j * kb..(j + 3) * kb];
                    ([t, &t[1..], &t[2..]], 3)
                } else {
                    ([wrow(j), wrow(j + 1), wrow(j + 2)], 1)
                };
                let mut i = 0;
                while i + 4 <= m {
                    let v = W::dots(&[row(i), row(i + 1), row(i + 2), row(i + 3)], &ws, stride);
                    (0..4).for_each(|r| (0..3).for_each(|c| put(i + r, j + c, v[r][c])));
                    i += 4;
                }
                while i < m {
                    let v = W::dots(&[row(i)], &ws, stride);
                    (0..3).for_each(|c| put(i, j + c, v[0][c]));
                    i += 1;
                }
                j += 3;
            } else {
                // one of the last n % 3 rows, stored plain
                debug_assert!(j >= n / 3 * 3);
                let ws = [wrow(j)];
                let mut i = 0;
                while i + 4 <= m {
                    let v = W::dots(&[row(i), row(i + 1), row(i + 2), row(i + 3)], &ws, 1);
                    (0..4).for_each(|r| put(i + r, j, v[r][0]));
                    i += 4;
                }
                while i < m {
                    put(i, j, W::dots(&[row(i)], &ws, 1)[0][0]);
                    i += 1;
                }
                j += 1;
            }
        }
    };
    // a small product (a LoRA factor, a few rows) costs less than waking the thread pool
    if m * n * k < SERIAL_BELOW {
        (0..n.div_ceil(block)).for_each(run_block);
    } else {
        (0..n.div_ceil(block)).into_par_iter().for_each(run_block);
    }
}

/// Multiply-adds below which the row kernel stays on the calling thread.
const SERIAL_BELOW: usize = 1 << 17;

/// The row kernel over candle storages: `x` `[m, k]` f32, `w` `[n, k]` f32 or bf16, both
/// contiguous.
fn rows_storage(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<(Vec<f32>, (usize, usize, usize))> {
    let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
    else {
        candle_core::bail!("rows_matmul: operands must be contiguous");
    };
    let ([m, k], [n, k2]) = (l1.dims(), l2.dims()) else {
        candle_core::bail!(
            "rows_matmul: {:?} x {:?}ᵀ must be 2-D",
            l1.dims(),
            l2.dims()
        );
    };
    let (m, k, n) = (*m, *k, *n);
    if k != *k2 {
        candle_core::bail!("rows_matmul: [{m}, {k}] x [{n}, {k2}]ᵀ");
    }
    let CpuStorage::F32(x) = s1 else {
        candle_core::bail!("rows_matmul: the input is not f32");
    };
    let mut out = vec![0f32; m * n];
    match s2 {
        CpuStorage::F32(w) => rows_kernel(&x[a0..a1], &w[b0..b1], (m, k, n), &mut out, false, 1.0),
        CpuStorage::BF16(w) => rows_kernel(&x[a0..a1], &w[b0..b1], (m, k, n), &mut out, false, 1.0),
        _ => candle_core::bail!("rows_matmul: weights must be f32 or bf16"),
    }
    Ok((out, (m, k, n)))
}

struct RowsMatMul;

impl CustomOp2 for RowsMatMul {
    fn name(&self) -> &'static str {
        "dialora-rows-matmul"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (out, (m, _, n)) = rows_storage(s1, l1, s2, l2)?;
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

/// `x·wᵀ` for `x: [m, k]` (f32) and a weight `w: [n, k]` (f32 or bf16), row by row: every
/// output is one dot product summed in an order fixed by `k` alone, so a row's result does not
/// depend on the other rows (how many sequences share a decode step), and each weight row is
/// read from memory once for all rows. On the CPU; elsewhere candle's matmul.
pub fn rows_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && x.rank() == 2 {
        x.contiguous()?
            .apply_op2_no_bwd(&w.contiguous()?, &RowsMatMul)
    } else {
        x.matmul(&w.to_dtype(x.dtype())?.t()?)
    }
}

/// A q8_0 weight `[n, k]` in candle's block layout, for the row kernel.
pub struct Q8Rows {
    blocks: Vec<BlockQ8>,
    n: usize,
    k: usize,
}

impl Q8Rows {
    /// From a quantized tensor of candle's `Q8_0` type (`[n, k]`, `k` a multiple of 32).
    pub fn from_qtensor(q: &candle_core::quantized::QTensor) -> Result<Self> {
        let (n, k) = q.shape().dims2()?;
        if q.dtype() != candle_core::quantized::GgmlDType::Q8_0 || k % 32 != 0 {
            candle_core::bail!("Q8Rows needs a Q8_0 tensor with rows of a multiple of 32");
        }
        let data = q.data()?;
        if data.len() != n * k / 32 * 34 {
            candle_core::bail!("Q8_0 data of {} bytes for [{n}, {k}]", data.len());
        }
        let plain: Vec<BlockQ8> = data
            .chunks_exact(34)
            .map(|c| {
                let mut qs = [0i8; 32];
                for (q, b) in qs.iter_mut().zip(&c[2..]) {
                    *q = *b as i8;
                }
                BlockQ8 {
                    d: half::f16::from_le_bytes([c[0], c[1]]),
                    qs,
                }
            })
            .collect();
        // rows in triples, block b of the triple's row j at 3b + j; the last n % 3 rows plain
        let kb = k / 32;
        let mut blocks = Vec::with_capacity(plain.len());
        for t in plain[..n / 3 * 3 * kb].chunks_exact(3 * kb) {
            blocks.extend((0..3 * kb).map(|i| t[(i % 3) * kb + i / 3]));
        }
        blocks.extend_from_slice(&plain[n / 3 * 3 * kb..]);
        Ok(Q8Rows { blocks, n, k })
    }

    pub fn bytes(&self) -> usize {
        self.blocks.len() * 34
    }

    /// `x·Wᵀ` for `x: [m, k]` in f32 on the CPU: the rows quantized to Q8_0 as candle's
    /// `QMatMul` quantizes them, then the row kernel's q8_0 × q8_0 products (each output one
    /// dot product in a fixed order, whatever the other rows).
    pub fn product(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        let (m, k) = x.dims2()?;
        if k != self.k {
            candle_core::bail!("q8_0 product: [{m}, {k}] x [{}, {}]ᵀ", self.n, self.k);
        }
        let v: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let q = quantize_rows(&v, k);
        let mut out = vec![0f32; m * self.n];
        rows_kernel(&q, &self.blocks, (m, k, self.n), &mut out, false, 1.0);
        Tensor::from_vec(out, (m, self.n), x.device())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32], r: usize, c: usize) -> Tensor {
        Tensor::from_vec(v.to_vec(), (r, c), &Device::Cpu).unwrap()
    }

    #[test]
    fn matmul_and_accumulate_match_candle() {
        let a = t(
            &(0..12).map(|i| i as f32 * 0.5 - 2.0).collect::<Vec<_>>(),
            3,
            4,
        );
        let b = t(&(0..20).map(|i| (i as f32).sin()).collect::<Vec<_>>(), 5, 4);
        // b is used transposed (a strided view): [3,4] x [4,5]
        let want = a.matmul(&b.t().unwrap()).unwrap();
        let got = matmul(&a, &b.t().unwrap()).unwrap();
        let diff = |x: &Tensor, y: &Tensor| crate::testing::max_abs_diff(x, y);
        assert!(diff(&got, &want) < 1e-5);
        let acc = matmul(&a, &b.t().unwrap()).unwrap();
        let acc = matmul_acc(acc, &a, &b.t().unwrap(), 0.5).unwrap();
        assert!(diff(&acc, &(&want * 1.5).unwrap()) < 1e-5, "{acc}");
        // batched [2, 3, m, k] x [2, 3, k, n] with the rhs a transposed view
        let x = Tensor::rand(-1f32, 1f32, (2, 3, 5, 4), &Device::Cpu).unwrap();
        let y = Tensor::rand(-1f32, 1f32, (2, 3, 6, 4), &Device::Cpu).unwrap();
        let want = x.matmul(&y.t().unwrap()).unwrap();
        let got = matmul(&x, &y.t().unwrap()).unwrap();
        assert_eq!(got.dims(), &[2, 3, 5, 6]);
        assert!(diff(&got, &want) < 1e-5);
        // a narrowed batch (non-zero start offset, strided batch dim)
        let xs = x.narrow(1, 1, 2).unwrap();
        let ys = y.narrow(1, 1, 2).unwrap().t().unwrap();
        let want = xs
            .contiguous()
            .unwrap()
            .matmul(&ys.contiguous().unwrap())
            .unwrap();
        assert!(diff(&matmul(&xs, &ys).unwrap(), &want) < 1e-5);
    }

    #[test]
    fn one_row_products_split_across_threads_match_candle() {
        // decoding one token: [1, k] x [k, n] with n past the split threshold, the weight
        // transposed (a strided view), plain and accumulating
        let x = Tensor::rand(-1f32, 1f32, (1, 96), &Device::Cpu).unwrap();
        let w = Tensor::rand(-1f32, 1f32, (1000, 96), &Device::Cpu).unwrap();
        let want = x.matmul(&w.t().unwrap()).unwrap();
        let got = matmul(&x, &w.t().unwrap()).unwrap();
        assert!(crate::testing::max_abs_diff(&got, &want) < 1e-4);
        let acc = matmul_acc(got, &x, &w.t().unwrap(), -1.0).unwrap();
        assert!(crate::testing::max_abs_diff(&acc, &want.zeros_like().unwrap()) < 1e-4);
    }

    /// The bit patterns of a tensor's values (results compared exactly).
    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    #[test]
    fn row_products_do_not_depend_on_the_other_rows() {
        let dev = Device::Cpu;
        for (k, n) in [(96usize, 300usize), (577, 70), (8, 1000)] {
            let x = Tensor::rand(-1f32, 1f32, (20, k), &dev).unwrap();
            let w = Tensor::rand(-1f32, 1f32, (n, k), &dev).unwrap();
            let want = x.matmul(&w.t().unwrap()).unwrap();
            let all = rows_matmul(&x, &w).unwrap();
            assert!(crate::testing::max_abs_diff(&all, &want) < 1e-4);
            for (s, m) in [(0usize, 1usize), (3, 1), (5, 2), (7, 9), (0, 20)] {
                let part = x.narrow(0, s, m).unwrap();
                assert_eq!(
                    bits(&rows_matmul(&part, &w).unwrap()),
                    bits(&all.narrow(0, s, m).unwrap())
                );
            }
            // bf16 weights: the same as their f32 widening
            let wb = w.to_dtype(candle_core::DType::BF16).unwrap();
            let wf = wb.to_dtype(candle_core::DType::F32).unwrap();
            assert_eq!(
                bits(&rows_matmul(&x, &wb).unwrap()),
                bits(&rows_matmul(&x, &wf).unwrap())
            );
        }
    }

    #[test]
    fn quantized_rows_are_candles_blocks() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let x = Tensor::rand(-3f32, 3f32, (5, 96), &Device::Cpu).unwrap();
        let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let ours: Vec<u8> = quantize_rows(&v, 96)
            .iter()
            .flat_map(|b| {
                let mut o = b.d.to_le_bytes().to_vec();
                o.extend(b.qs.iter().map(|&q| q as u8));
                o
            })
            .collect();
        let q = QTensor::quantize(&x, GgmlDType::Q8_0).unwrap();
        assert_eq!(ours, q.data().unwrap().to_vec());
    }

    #[test]
    fn q8_0_rows_are_the_product_of_their_quantized_inputs_and_weights() {
        use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
        let dev = Device::Cpu;
        let x = Tensor::rand(-1f32, 1f32, (9, 96), &dev).unwrap();
        let w = Tensor::rand(-1f32, 1f32, (70, 96), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let rows = Q8Rows::from_qtensor(&q).unwrap();
        let got = rows.product(&x).unwrap();
        // the exact product of the dequantized input rows and weights
        let deq = |t: &Tensor| {
            QTensor::quantize(t, GgmlDType::Q8_0)
                .unwrap()
                .dequantize(&dev)
                .unwrap()
                .to_dtype(candle_core::DType::F64)
                .unwrap()
        };
        let want = deq(&x).matmul(&deq(&w).t().unwrap()).unwrap();
        let got64 = got.to_dtype(candle_core::DType::F64).unwrap();
        assert!(crate::testing::max_abs_diff(&got64, &want) < 1e-5);
        // candle's QMatMul computes the same products (in another order)
        let theirs = candle_core::Module::forward(&QMatMul::from_qtensor(q).unwrap(), &x).unwrap();
        assert!(crate::testing::max_abs_diff(&got, &theirs) < 1e-5);
        for (s, m) in [(0usize, 1usize), (4, 1), (2, 5), (0, 9)] {
            let part = rows.product(&x.narrow(0, s, m).unwrap()).unwrap();
            assert_eq!(bits(&part), bits(&got.narrow(0, s, m).unwrap()));
        }
        assert_eq!(rows.bytes(), 70 * 96 / 32 * 34);
    }

    #[test]
    fn q8_0_dots_are_the_same_bits_with_every_instruction_set() {
        // extreme bytes included: -128 and 127 in the weights, ±127 in the inputs
        let mut seed = 7u64;
        let mut byte = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 56) as u8 as i8
        };
        let mut block = |lo: i8| {
            let mut qs = [0i8; 32];
            qs.iter_mut().for_each(|q| *q = byte().max(lo));
            qs[0] = lo;
            qs[1] = 127;
            let d = half::f16::from_f32((byte() as f32).abs() / 1000.0 + 1e-3);
            BlockQ8 { d, qs }
        };
        let xs: Vec<Vec<BlockQ8>> = (0..4)
            .map(|_| (0..7).map(|_| block(-127)).collect())
            .collect();
        let ws: Vec<Vec<BlockQ8>> = (0..3)
            .map(|_| (0..7).map(|_| block(-128)).collect())
            .collect();
        let xr = [&xs[0][..], &xs[1][..], &xs[2][..], &xs[3][..]];
        let wr = [&ws[0][..], &ws[1][..], &ws[2][..]];
        let plain = dots_q8_with(Simd::Plain, &xr, &wr, 1);
        // the exact sums, in f64
        for r in 0..4 {
            for j in 0..3 {
                let exact: f64 = xs[r]
                    .iter()
                    .zip(&ws[j])
                    .map(|(x, w)| {
                        let s: i32 = (0..32).map(|i| x.qs[i] as i32 * w.qs[i] as i32).sum();
                        s as f64 * x.d.to_f64() * w.d.to_f64()
                    })
                    .sum();
                assert!((plain[r][j] as f64 - exact).abs() < 1e-3 * exact.abs().max(1.0));
            }
        }
        let bits = |v: [[f32; 3]; 4]| v.map(|r| r.map(f32::to_bits));
        for level in [Simd::Avx2, Simd::Vnni] {
            if level <= simd() {
                assert_eq!(
                    bits(dots_q8_with(level, &xr, &wr, 1)),
                    bits(plain),
                    "{level:?}"
                );
            }
        }
        // and one row at a time
        let one = dots_q8_with(simd(), &[xr[2]], &[wr[1]], 1);
        assert_eq!(one[0][0].to_bits(), plain[2][1].to_bits());
    }
}
