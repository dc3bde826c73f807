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

pub(super) fn get_threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// A destination pointer shared by the parallel column blocks (each writes its own columns).
#[derive(Clone, Copy)]
pub(super) struct Dst(pub(super) *mut f32);
// SAFETY: the blocks write disjoint column ranges of one row.
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

impl Dst {
    /// The pointer (a method, so that closures capture the whole `Dst`, which is `Sync`).
    pub(super) fn ptr(&self) -> *mut f32 {
        self.0
    }
}

/// `[1, k]·[k, n]`, the product of decoding one token: the gemm crate runs it as a GEMV on one
/// thread, so the columns are split into blocks run in parallel, each a GEMV of its own.
///
/// # Safety
/// As `run`.
unsafe fn run_row(dst: *mut f32, a: &Operand, b: &Operand, accumulate: bool, alpha: f32) {
    let n = b.cols;
    let block = n.div_ceil(4 * get_threads()).max(64);
    let dst = Dst(dst);
    super::team::par_for(n.div_ceil(block), |i| {
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

/// A weight element the row kernel reads: f32, or bf16 widened to f32 as it is read. Each
/// output is a sequence of operations fixed by `k` alone, whatever the other rows.
pub(crate) trait WeightElem: Copy + Send + Sync {
    /// The dot products of `R` input rows with `C` weight rows, all of one length.
    fn dots<const R: usize, const C: usize>(xs: &[&[f32]; R], ws: &[&[Self]; C]) -> [[f32; C]; R];
}

impl WeightElem for f32 {
    #[inline(always)]
    fn dots<const R: usize, const C: usize>(xs: &[&[f32]; R], ws: &[&[Self]; C]) -> [[f32; C]; R] {
        #[cfg(target_arch = "x86_64")]
        if simd() >= Simd::Avx2 {
            // SAFETY: AVX2 and FMA were detected; every row is k long (`rows_kernel`)
            return unsafe { avx::dots_f32(xs, ws) };
        }
        dots_plain(xs, ws, |row, i| row[i])
    }
}

impl WeightElem for half::bf16 {
    #[inline(always)]
    fn dots<const R: usize, const C: usize>(xs: &[&[f32]; R], ws: &[&[Self]; C]) -> [[f32; C]; R] {
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

/// How far ahead of its reads a kernel that streams weights from memory asks for them. A
/// decode step's products read every weight once, a few rows at a time, and left to the
/// hardware prefetcher a core read bf16 rows at ~7 GB/s and f32 ones at ~14 (a 2-vCPU Xeon
/// whose two cores read 29 GB/s together): a bf16 step took half again as long as its bytes
/// needed. With each line asked for 8 KiB ahead both read at the machine's bandwidth
/// (BENCHMARKS.md, session 13; 2 to 16 KiB all helped, 8 most).
pub(crate) const PREFETCH: usize = 8192;

/// Asks for the cache line `PREFETCH` bytes past `p` (any address: a prefetch reads nothing the
/// program sees and never faults).
#[inline(always)]
pub fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as said
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH) as *const i8)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// `prefetch` for every cache line of the `bytes` from `p` (a weight row, a block of groups).
#[inline(always)]
pub(super) fn prefetch_span(p: *const u8, bytes: usize) {
    for at in (0..bytes).step_by(64) {
        prefetch(p.wrapping_add(at));
    }
}

/// The dot products with AVX2 + FMA intrinsics: `R` input rows against `C` weight rows, an
/// 8-lane accumulator each (12 of them at 4 × 3, with the loads, the 16 registers).
#[cfg(target_arch = "x86_64")]
pub(super) mod avx {
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
    pub(in crate::model) unsafe fn hsum(v: __m256) -> f32 {
        let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
        _mm_cvtss_f32(q)
    }

    /// `super::add_h_bt` with AVX2 and FMA: eight columns of a row at a time, the last ones
    /// one at a time by `mul_add` (the same rounding as one lane of `vfmadd`).
    ///
    /// # Safety
    /// AVX2 and FMA; as `super::add_h_bt`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn add_h_bt(
        h: &[f32],
        bt: &[f32],
        (n, r, out): (usize, usize, usize),
        y: super::Dst,
        alpha: f32,
        cols: std::ops::Range<usize>,
    ) {
        let full = cols.start + (cols.len() / 8) * 8;
        let al = _mm256_set1_ps(alpha);
        // `V` vectors of a row at a time: as many sums in flight
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn vectors<const V: usize>(
            hi: &[f32],
            bt: *const f32,
            out: usize,
            yj: *mut f32,
            al: __m256,
        ) {
            let mut acc = [_mm256_setzero_ps(); V];
            for (t, &ht) in hi.iter().enumerate() {
                let hv = _mm256_set1_ps(ht);
                for (v, a) in acc.iter_mut().enumerate() {
                    let b = _mm256_loadu_ps(bt.add(t * out + 8 * v));
                    *a = _mm256_fmadd_ps(hv, b, *a);
                }
            }
            for (v, a) in acc.iter().enumerate() {
                let p = yj.add(8 * v);
                _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), _mm256_mul_ps(al, *a)));
            }
        }
        for i in 0..n {
            let hi = &h[i * r..(i + 1) * r];
            let yi = y.ptr().add(i * out);
            let mut j = cols.start;
            while j + 32 <= full {
                vectors::<4>(hi, bt.as_ptr().add(j), out, yi.add(j), al);
                j += 32;
            }
            while j < full {
                vectors::<1>(hi, bt.as_ptr().add(j), out, yi.add(j), al);
                j += 8;
            }
            for j in full..cols.end {
                let mut acc = 0f32;
                for (t, &ht) in hi.iter().enumerate() {
                    acc = ht.mul_add(bt[t * out + j], acc);
                }
                *yi.add(j) += alpha * acc;
            }
        }
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
                let step = |c: usize, acc: &mut [[__m256; C]; R]| {
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
                };
                // a cache line of each weight row at a time, the line PREFETCH bytes ahead of
                // it asked for first
                let line = 64 / std::mem::size_of::<$W>();
                let mut c = 0;
                while c + line <= n {
                    for j in 0..C {
                        super::prefetch(ws[j].as_ptr().add(c) as *const u8);
                    }
                    for s in (0..line).step_by(8) {
                        step(c + s, &mut acc);
                    }
                    c += line;
                }
                while c < n {
                    step(c, &mut acc);
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
/// against four input rows at a time.
fn rows_kernel<W: WeightElem>(
    x: &[f32],
    w: &[W],
    (m, k, n): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    alpha: f32,
) {
    assert!(x.len() == m * k && w.len() == n * k && dst.len() == m * n);
    let threads = get_threads().max(1);
    let block = n.div_ceil(4 * threads).clamp(24, 1536);
    let out = Dst(dst.as_mut_ptr());
    let run_block = |bi: usize| {
        let cols = bi * block..((bi + 1) * block).min(n);
        // SAFETY: `out` is the m × n destination (asserted); each block writes its own columns
        unsafe { rows_block(x, w, (m, k, n), out, accumulate, alpha, cols) }
    };
    // a small product (a LoRA factor, a few rows) costs less than waking the thread pool
    if m * n * k < SERIAL_BELOW {
        (0..n.div_ceil(block)).for_each(run_block);
    } else {
        super::team::par_for(n.div_ceil(block), run_block);
    }
}

/// Columns `cols` of the row kernel's product (`rows_kernel`): three weight rows against four
/// input rows at a time. Every output is the same dot product however the columns are cut.
///
/// # Safety
/// `out` is valid for the `m × n` destination, and nothing else writes columns `cols` of it
/// meanwhile; `x` is `m × k` and `w` `n × k`, `cols` within `0..n`.
unsafe fn rows_block<W: WeightElem>(
    x: &[f32],
    w: &[W],
    (m, k, n): (usize, usize, usize),
    out: Dst,
    accumulate: bool,
    alpha: f32,
    cols: std::ops::Range<usize>,
) {
    let row = |i: usize| &x[i * k..(i + 1) * k];
    let wrow = |j: usize| &w[j * k..(j + 1) * k];
    let put = |i: usize, j: usize, v: f32| {
        let v = alpha * v;
        // SAFETY: (i, j) is inside the m × n destination, in this call's columns
        unsafe {
            let p = out.ptr().add(i * n + j);
            *p = if accumulate { *p + v } else { v };
        }
    };
    let mut j = cols.start;
    while j + 3 <= cols.end {
        let ws = [wrow(j), wrow(j + 1), wrow(j + 2)];
        let mut i = 0;
        while i + 4 <= m {
            let v = W::dots(&[row(i), row(i + 1), row(i + 2), row(i + 3)], &ws);
            (0..4).for_each(|r| (0..3).for_each(|c| put(i + r, j + c, v[r][c])));
            i += 4;
        }
        while i < m {
            let v = W::dots(&[row(i)], &ws);
            (0..3).for_each(|c| put(i, j + c, v[0][c]));
            i += 1;
        }
        j += 3;
    }
    while j < cols.end {
        let ws = [wrow(j)];
        let mut i = 0;
        while i + 4 <= m {
            let v = W::dots(&[row(i), row(i + 1), row(i + 2), row(i + 3)], &ws);
            (0..4).for_each(|r| put(i + r, j, v[r][0]));
            i += 4;
        }
        while i < m {
            put(i, j, W::dots(&[row(i)], &ws)[0][0]);
            i += 1;
        }
        j += 1;
    }
}

/// Multiply-adds below which the row kernel stays on the calling thread.
pub(super) const SERIAL_BELOW: usize = 1 << 17;

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

/// One run of decode rows and its LoRA branch: `(first row, rows, A [r, in], Bᵀ [r, out],
/// scale)` (`Lora::row_factors`).
pub(crate) type LoraRun = (usize, usize, Tensor, Tensor, f64);

/// The contiguous f32 data of a CPU tensor's storage.
fn cpu_f32<'a>(s: &'a candle_core::Storage, l: &Layout) -> Result<&'a [f32]> {
    match s {
        candle_core::Storage::Cpu(s) => super::ops::f32_slice(s, l),
        _ => candle_core::bail!("add_lora_rows: a tensor not on the CPU"),
    }
}

/// `y[rows of a run] += scale · (x_run Aᵀ) B` for every run, `x: [rows, in]`, `y: [rows, out]`:
/// the LoRA terms of a step's runs of adapters, with no tensor op per run (a step spread over
/// four adapters would otherwise take some twenty per layer). `h = x_run Aᵀ` by the row kernel
/// (dot products of length `in`), then `h Bᵀ` eight outputs at a time (`add_h_bt`: with `r`
/// terms, a dot product per output would spend more on its horizontal sum than on its
/// products). Every row takes the same operations, whatever the other rows.
pub(crate) fn add_lora_rows(y: Tensor, x: &Tensor, runs: &[LoraRun]) -> Result<Tensor> {
    let cpu = |t: &Tensor| is_cpu_f32(t) && t.rank() == 2;
    if !(cpu(&y) && cpu(x) && runs.iter().all(|r| cpu(&r.2) && cpu(&r.3))) {
        let mut y = y;
        for (start, n, a, bt, scale) in runs {
            let h = rows_matmul(&x.narrow(0, *start, *n)?, a)?;
            let d = (h.matmul(&bt.to_dtype(h.dtype())?)? * *scale)?;
            let sum = (y.narrow(0, *start, *n)? + d)?;
            y = y.slice_assign(&[*start..start + n, 0..y.dim(1)?], &sum)?;
        }
        return Ok(y);
    }
    let (rows, out) = y.dims2()?;
    let k = x.dim(1)?;
    let mut yv: Vec<f32> = y.flatten_all()?.to_vec1()?;
    let x = x.contiguous()?;
    let (sx, lx) = x.storage_and_layout();
    let xv = cpu_f32(&sx, lx)?;
    let mut factors = Vec::with_capacity(runs.len());
    let mut end = 0;
    for (start, n, a, bt, _) in runs {
        let (start, n, r) = (*start, *n, a.dim(0)?);
        if start < end || start + n > rows || a.dim(1)? != k || bt.dims() != [r, out] {
            candle_core::bail!(
                "LoRA run {start}+{n} of [{rows}, {k}] with A {:?}, Bᵀ {:?}",
                a.dims(),
                bt.dims()
            );
        }
        end = start + n;
        factors.push((a.contiguous()?, bt.contiguous()?));
    }
    let held: Vec<_> = factors
        .iter()
        .map(|(a, b)| (a.storage_and_layout(), b.storage_and_layout()))
        .collect();
    let ab: Vec<(&[f32], &[f32])> = held
        .iter()
        .map(|((sa, la), (sb, lb))| Ok((cpu_f32(sa, la)?, cpu_f32(sb, lb)?)))
        .collect::<Result<_>>()?;
    // h of every run, the runs in parallel; then every run's output columns in blocks, all in
    // parallel: a step spread over several adapters reads each one's factors on all the
    // threads, not one adapter after another on the calling thread
    let r = |i: usize| ab[i].0.len() / k;
    let mut hs: Vec<Vec<f32>> = runs
        .iter()
        .enumerate()
        .map(|(i, run)| vec![0f32; run.1 * r(i)])
        .collect();
    let hd: Vec<Dst> = hs.iter_mut().map(|h| Dst(h.as_mut_ptr())).collect();
    super::team::par_for(runs.len(), |i| {
        let (start, n) = (runs[i].0, runs[i].1);
        let x = &xv[start * k..(start + n) * k];
        // SAFETY: run i's own h, n × r
        unsafe { rows_block(x, ab[i].0, (n, k, r(i)), hd[i], false, 1.0, 0..r(i)) }
    });
    const BLOCK: usize = 128;
    let tasks: Vec<(usize, std::ops::Range<usize>)> = (0..runs.len())
        .flat_map(|i| {
            (0..out)
                .step_by(BLOCK)
                .map(move |c| (i, c..(c + BLOCK).min(out)))
        })
        .collect();
    let yd = Dst(yv.as_mut_ptr());
    super::team::par_for(tasks.len(), |t| {
        let (i, cols) = tasks[t].clone();
        let (start, n, _, _, scale) = &runs[i];
        // SAFETY: rows start..start + n of y (runs do not overlap: checked), columns `cols`:
        // this task's alone
        unsafe {
            let y = Dst(yd.ptr().add(start * out));
            add_h_bt(&hs[i], ab[i].1, (*n, r(i), out), y, *scale as f32, cols)
        }
    });
    drop(held);
    Tensor::from_vec(yv, (rows, out), y.device())
}

/// `y_i[j] += alpha · Σ_t h_i[t] · bt[t][j]` for the `n` rows of `h` (`[n, r]`) and the columns
/// `cols` of `bt` (`[r, out]`), `y` `[n, out]`: each output summed over `t` in order from 0,
/// eight columns at a time (the last ones one at a time, the same operations).
///
/// # Safety
/// `y` is valid for `n × out` values and nothing else writes columns `cols` of it meanwhile;
/// `h` is `n × r`, `bt` `r × out`, `cols` within `0..out`.
unsafe fn add_h_bt(
    h: &[f32],
    bt: &[f32],
    (n, r, out): (usize, usize, usize),
    y: Dst,
    alpha: f32,
    cols: std::ops::Range<usize>,
) {
    assert!(h.len() == n * r && bt.len() == r * out && cols.end <= out);
    #[cfg(target_arch = "x86_64")]
    if simd() >= Simd::Avx2 {
        // SAFETY: AVX2 and FMA were detected; as this function's own
        return unsafe { avx::add_h_bt(h, bt, (n, r, out), y, alpha, cols) };
    }
    for i in 0..n {
        for j in cols.clone() {
            let mut acc = 0f32;
            for t in 0..r {
                acc += h[i * r + t] * bt[t * out + j];
            }
            // SAFETY: (i, j) inside y, in this call's columns
            unsafe { *y.ptr().add(i * out + j) += alpha * acc };
        }
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
    fn lora_runs_are_added_as_the_tensor_ops_add_them() {
        use candle_core::DType;
        let dev = Device::Cpu;
        let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        // f32 takes the kernels into the output; f64 the tensor ops, one run at a time; 43
        // output columns: five of eight and a tail
        for (dt, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-12)] {
            let r = |d: (usize, usize)| {
                Tensor::rand(-1f32, 1f32, d, &dev)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap()
            };
            let (x, y) = (r((7, 96)), r((7, 43)));
            let (a1, b1, a2, b2) = (r((4, 96)), r((43, 4)), r((8, 96)), r((43, 8)));
            let bt = |b: &Tensor| b.t().unwrap().contiguous().unwrap();
            // rows 0..2 on adapter 1, 2..3 none, 3..7 on adapter 2
            let runs: Vec<LoraRun> = vec![
                (0, 2, a1.clone(), bt(&b1), 2.0),
                (3, 4, a2.clone(), bt(&b2), 0.5),
            ];
            let got = add_lora_rows(y.clone(), &x, &runs).unwrap();
            let delta = |s: usize, n: usize, a: &Tensor, b: &Tensor, c: f64| {
                let h = f64s(&x.narrow(0, s, n).unwrap())
                    .matmul(&f64s(a).t().unwrap())
                    .unwrap();
                (h.matmul(&f64s(b).t().unwrap()).unwrap() * c).unwrap()
            };
            let want = (f64s(&y)
                + Tensor::cat(
                    &[
                        delta(0, 2, &a1, &b1, 2.0),
                        Tensor::zeros((1, 43), DType::F64, &dev).unwrap(),
                        delta(3, 4, &a2, &b2, 0.5),
                    ],
                    0,
                )
                .unwrap())
            .unwrap();
            let d = crate::testing::max_abs_diff(&f64s(&got), &want);
            assert!(d < tol, "{dt:?}: {d}");
            // the row without a run is left as it was, bit for bit
            assert_eq!(
                f64s(&got.narrow(0, 2, 1).unwrap())
                    .to_vec2::<f64>()
                    .unwrap(),
                f64s(&y.narrow(0, 2, 1).unwrap()).to_vec2::<f64>().unwrap()
            );
            if dt == DType::F32 {
                // a run's rows are the same bits computed without the other run
                let alone = add_lora_rows(
                    y.narrow(0, 3, 4).unwrap(),
                    &x.narrow(0, 3, 4).unwrap(),
                    &[(0, 4, a2.clone(), bt(&b2), 0.5)],
                )
                .unwrap();
                assert_eq!(bits(&alone), bits(&got.narrow(0, 3, 4).unwrap()));
            }
        }
        // runs that overlap or leave the rows are refused
        let x = Tensor::zeros((4, 8), DType::F32, &dev).unwrap();
        let (a, b) = (
            Tensor::zeros((2, 8), DType::F32, &dev).unwrap(),
            Tensor::zeros((2, 5), DType::F32, &dev).unwrap(),
        );
        let y = || Tensor::zeros((4, 5), DType::F32, &dev).unwrap();
        let run = |s, n| (s, n, a.clone(), b.clone(), 1.0);
        assert!(add_lora_rows(y(), &x, &[run(0, 3), run(2, 2)]).is_err());
        assert!(add_lora_rows(y(), &x, &[run(3, 2)]).is_err());
        assert!(add_lora_rows(y(), &x, &[run(0, 2), run(2, 2)]).is_ok());
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
}
