//! The fused kernels of the training step, each one candle custom op behind one function:
//!
//! | function | kernel |
//! |---|---|
//! | `causal_softmax` | `softmax(scale * s + causal mask)`, in place |
//! | `softmax_backward` | `scale * P * (dP - sum(P * dP))`, in place |
//! | `rms_norm_backward` | RMSNorm's input gradient |
//! | `swiglu`, `swiglu_backward` | `silu(g) * u` and its two gradients |
//! | `dropout`, `add_dropped` | LoRA dropout with a counter-based mask (`DropoutMask`) |
//! | `cross_entropy` | token losses and, in place, the logits gradient |
//!
//! Each op has three bodies: a CPU body (contiguous f32, multi-threaded, one pass per row), a
//! CUDA body (f32 and bf16, `kernels/ops.cu`, with the `cuda` feature), and a plain-candle
//! reference (`*_generic`: any device and dtype, what f64 gradient checks and other dtypes run).
//! Call sites call the function; it takes the custom op when a body exists for the tensors'
//! device and dtype, and candle dispatches on the storage. `force_generic` (or the environment
//! variable `DIALORA_GENERIC_OPS=1`) sends every call to the references, so tests compare the
//! paths on any machine. RMSNorm and RoPE forwards are candle's own fused kernels (CPU and
//! CUDA); their backwards are written here (RoPE's is a rotation by the opposite angle).

use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor, D};
use std::cell::Cell;

thread_local! {
    static FORCE_GENERIC: Cell<bool> = const { Cell::new(false) };
}

/// Sends this thread's kernel calls to the plain-candle references (`true`) or back to the
/// custom ops (`false`).
pub fn force_generic(on: bool) {
    FORCE_GENERIC.with(|f| f.set(on));
}

fn generic_forced() -> bool {
    static ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    FORCE_GENERIC.with(|f| f.get())
        || *ENV.get_or_init(|| {
            std::env::var("DIALORA_GENERIC_OPS").is_ok_and(|v| !v.is_empty() && v != "0")
        })
}

/// Whether the custom ops take these tensors: all contiguous, of one dtype, and either f32 on
/// the CPU or (cuda builds) f32/bf16 on a CUDA device.
pub(crate) fn fused(ts: &[&Tensor]) -> bool {
    let Some(first) = ts.first() else {
        return false;
    };
    let dt = first.dtype();
    let body = match first.device() {
        candle_core::Device::Cpu => dt == DType::F32,
        candle_core::Device::Cuda(_) => {
            cfg!(feature = "cuda") && matches!(dt, DType::F32 | DType::BF16)
        }
        _ => false,
    };
    body && !generic_forced() && ts.iter().all(|t| t.dtype() == dt && t.is_contiguous())
}

/// Whether `t` is an f32 tensor on the CPU (the fast GEMMs' domain).
pub(crate) fn is_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// The contiguous f32 data of a CPU storage (custom-op kernels).
pub(crate) fn f32_slice<'a>(st: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (st, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("CPU kernel: contiguous f32 tensors only"),
    }
}

/// The contiguous f32 data of a CPU storage, mutably (in-place kernels).
pub(crate) fn f32_mut<'a>(st: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    match (st, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("in-place kernel: contiguous f32 CPU tensors only"),
    }
}

/// Rows per parallel task for the row kernels on the CPU.
fn par_rows(cols: usize) -> usize {
    (16384 / cols.max(1)).max(1)
}

/// Elements per parallel task for the element-wise kernels on the CPU.
const PAR_ELEMS: usize = 16384;

fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1)
}

/// The CUDA side: dialora's PTX module and launch shapes.
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
    use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice};
    use candle_core::{CudaStorage, DType, Layout, Result};

    pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ops.ptx"));
    /// Threads per block (the kernels' BLOCK).
    const BLOCK: u32 = 256;

    /// The name of kernel `name` for `dtype` (`name_f32` / `name_bf16` in kernels/ops.cu).
    pub fn kernel(name: &str, dtype: DType) -> Result<String> {
        match dtype {
            DType::F32 => Ok(format!("{name}_f32")),
            DType::BF16 => Ok(format!("{name}_bf16")),
            dt => candle_core::bail!("{name}: no CUDA kernel for {dt:?}"),
        }
    }

    /// One block per row.
    pub fn per_row(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// One thread per element (grid-stride loops cover the rest).
    pub fn per_elem(n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(BLOCK as usize).clamp(1, 1 << 20);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// A storage's data from the layout's offset: f32 or bf16 (as raw device memory of the
    /// kernels' element type).
    pub enum Slice<'a> {
        F32(candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>),
        Bf16(candle_core::cuda_backend::cudarc::driver::CudaView<'a, half::bf16>),
    }

    pub fn slice<'a>(s: &'a CudaStorage, l: &Layout) -> Result<Slice<'a>> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("CUDA kernel: contiguous tensors only");
        };
        Ok(match &s.slice {
            CudaStorageSlice::F32(v) => Slice::F32(v.slice(a..b)),
            CudaStorageSlice::BF16(v) => Slice::Bf16(v.slice(a..b)),
            _ => candle_core::bail!("CUDA kernel: f32 or bf16 tensors only"),
        })
    }

    /// A fresh output of `n` elements of `dtype`, wrapped as a storage.
    pub fn output(dev: &CudaDevice, dtype: DType, n: usize) -> Result<CudaStorage> {
        // SAFETY: every element is written by the kernel that receives it.
        Ok(match dtype {
            DType::F32 => {
                CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<f32>(n)? }, dev.clone())
            }
            DType::BF16 => {
                CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<half::bf16>(n)? }, dev.clone())
            }
            dt => candle_core::bail!("CUDA kernel: no output of {dt:?}"),
        })
    }

    /// Pushes a slice as a kernel argument (the kernels take raw pointers of their type).
    pub fn arg<'a>(
        b: &mut candle_core::cuda_backend::cudarc::driver::LaunchArgs<'a>,
        s: &'a Slice<'a>,
    ) {
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        match s {
            Slice::F32(v) => b.arg(v),
            Slice::Bf16(v) => b.arg(v),
        };
    }

    /// The whole of a slice (for outputs).
    pub fn full(s: &CudaStorage) -> Result<Slice<'_>> {
        Ok(match &s.slice {
            CudaStorageSlice::F32(v) => Slice::F32(v.slice(..)),
            CudaStorageSlice::BF16(v) => Slice::Bf16(v.slice(..)),
            _ => candle_core::bail!("CUDA kernel: f32 or bf16 tensors only"),
        })
    }
}

/// Launches kernel `$name` of kernels/ops.cu on `$dev` for `$dtype`: the tensor slices
/// (`cuda::Slice`) first, then the other arguments, in the kernel's parameter order.
#[cfg(feature = "cuda")]
macro_rules! launch {
    ($dev:expr, $name:literal, $dtype:expr, $cfg:expr; [$($s:expr),* $(,)?]; [$($v:expr),* $(,)?]) => {{
        use candle_core::cuda_backend::{cudarc::driver::PushKernelArg, WrapErr};
        let f = $dev.get_or_load_custom_func(&cuda::kernel($name, $dtype)?, "dialora_ops", cuda::PTX)?;
        let mut b = f.builder();
        $( cuda::arg(&mut b, $s); )*
        $( b.arg($v); )*
        // SAFETY: the arguments match the kernel's parameters (kernels/ops.cu)
        unsafe { b.launch($cfg) }.w()?;
    }};
}

// ---------------------------------------------------------------------------------------------
// Causal softmax

/// Causal softmax of attention scores `s: [.., rows, past + t]` whose rows are the `t` new
/// query positions (repeated for grouped heads folded into the rows):
/// `softmax(scale * s + mask)`, where row `r` sees keys `0..=past + r % t`. The custom op
/// writes over `s` in place (so `s` must own its storage: a fresh matmul result); masked
/// entries come out exactly 0.
pub fn causal_softmax(s: Tensor, scale: f64, t: usize, past: usize) -> Result<Tensor> {
    let cols = s.dim(D::Minus1)?;
    if cols != past + t {
        candle_core::bail!("causal_softmax: {cols} key columns for {past} + {t} positions");
    }
    if fused(&[&s]) {
        s.inplace_op1(&CausalSoftmax { scale, t, past })?;
        return Ok(s);
    }
    causal_softmax_generic(&s, scale, t, past)
}

/// Causal softmax from candle ops (f32 accumulation for half precision).
pub fn causal_softmax_generic(s: &Tensor, scale: f64, t: usize, past: usize) -> Result<Tensor> {
    let mut x = (s * scale)?;
    if t > 1 {
        let rep = x.dim(D::Minus2)? / t;
        x = x.broadcast_add(&causal_mask(t, past, rep, x.dtype(), x.device())?)?;
    }
    softmax_last_dim(&x)
}

/// `softmax(scale · s)` of one row in place, in f32: the CPU body of `causal_softmax` on a
/// row's unmasked part, and of the host attention (`kv::attend_host`). With AVX2 and FMA eight
/// values at a time (`exp8`); the sum in eight lanes, then the lanes in a fixed order, so a
/// row's result depends on its values alone.
#[inline(always)]
pub(crate) fn softmax_row(s: &mut [f32], scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if super::matmul::simd() >= super::matmul::Simd::Avx2 {
        // SAFETY: AVX2 and FMA were detected
        return unsafe { avx::row(s, scale) };
    }
    let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) * scale;
    let mut sum = 0f32;
    for x in s.iter_mut() {
        *x = (*x * scale - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    s.iter_mut().for_each(|x| *x *= inv);
}

/// The CPU bodies eight values at a time with AVX2 and FMA: the exponential, and the softmax
/// and SwiGLU that take it.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx {
    use super::super::matmul::avx::hsum;
    use std::arch::x86_64::*;

    /// `exp` of eight values: `2^n · p(r)` with `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`, and `p`
    /// Cephes' degree-7 polynomial for `expf` (within 2 ulp of the correctly rounded value);
    /// 0 below `ln(2^-126)` (no subnormals), +inf above `ln(f32::MAX)`, NaN for NaN.
    ///
    /// # Safety
    /// AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn exp8(x: __m256) -> __m256 {
        const LOW: f32 = -87.33654; // ln(2^-126)
        const HIGH: f32 = 88.72283; // ln(f32::MAX)
        let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(LOW));
        let over = _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_set1_ps(HIGH));
        // NaN stays NaN: max and min return their second operand when one is NaN
        let c = _mm256_min_ps(_mm256_set1_ps(HIGH), _mm256_max_ps(_mm256_set1_ps(LOW), x));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(c, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        // r = c - n·ln 2, ln 2 in two parts so that n·ln2_hi is exact
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), c);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let p = _mm256_fmadd_ps(
            p,
            _mm256_mul_ps(r, r),
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        // 2^n by the exponent bits; n = 128 (x near HIGH) as 2 · 2^127
        let n1 = _mm256_min_ps(n, _mm256_set1_ps(127.0));
        let pow = |n: __m256| {
            _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                _mm256_cvtps_epi32(n),
                _mm256_set1_epi32(127),
            )))
        };
        let y = _mm256_mul_ps(p, pow(n1));
        let y = _mm256_mul_ps(y, pow(_mm256_sub_ps(n, n1)));
        let y = _mm256_andnot_ps(under, y);
        _mm256_blendv_ps(y, _mm256_set1_ps(f32::INFINITY), over)
    }

    /// `out = silu(g) · u = g / (1 + exp(−g)) · u`, element by element (the last values in one
    /// more vector, padded: every value the same operations wherever it falls).
    ///
    /// # Safety
    /// AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn swiglu(g: &[f32], u: &[f32], out: &mut [f32]) {
        assert!(g.len() == out.len() && u.len() == out.len());
        let one = _mm256_set1_ps(1.0);
        let f = |g: __m256, u: __m256| {
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
            _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u)
        };
        let n = out.len() / 8 * 8;
        for i in (0..n).step_by(8) {
            let v = f(
                _mm256_loadu_ps(g.as_ptr().add(i)),
                _mm256_loadu_ps(u.as_ptr().add(i)),
            );
            _mm256_storeu_ps(out.as_mut_ptr().add(i), v);
        }
        let (mut gt, mut ut, mut o) = ([0f32; 8], [0f32; 8], [0f32; 8]);
        let rest = out.len() - n;
        gt[..rest].copy_from_slice(&g[n..]);
        ut[..rest].copy_from_slice(&u[n..]);
        _mm256_storeu_ps(
            o.as_mut_ptr(),
            f(_mm256_loadu_ps(gt.as_ptr()), _mm256_loadu_ps(ut.as_ptr())),
        );
        out[n..].copy_from_slice(&o[..rest]);
    }

    /// `softmax(scale · s)` in place.
    ///
    /// # Safety
    /// AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn row(s: &mut [f32], scale: f32) {
        let (len, n) = (s.len(), s.len() / 8 * 8);
        let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) * scale;
        let (sc, mx) = (_mm256_set1_ps(scale), _mm256_set1_ps(max));
        let mut sum = _mm256_setzero_ps();
        let p = s.as_mut_ptr();
        for i in (0..n).step_by(8) {
            let e = exp8(_mm256_sub_ps(
                _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), sc),
                mx,
            ));
            _mm256_storeu_ps(p.add(i), e);
            sum = _mm256_add_ps(sum, e);
        }
        // the tail in one more vector, padded with values whose exponential is 0
        let mut tail = [f32::NEG_INFINITY; 8];
        tail[..len - n].copy_from_slice(&s[n..]);
        let e = exp8(_mm256_sub_ps(
            _mm256_mul_ps(_mm256_loadu_ps(tail.as_ptr()), sc),
            mx,
        ));
        _mm256_storeu_ps(tail.as_mut_ptr(), e);
        let sum = _mm256_add_ps(sum, e);
        s[n..].copy_from_slice(&tail[..len - n]);
        let inv = _mm256_set1_ps(1.0 / hsum(sum));
        for i in (0..n).step_by(8) {
            _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), inv));
        }
        let inv = _mm256_cvtss_f32(inv);
        s[n..].iter_mut().for_each(|x| *x *= inv);
    }
}

struct CausalSoftmax {
    scale: f64,
    t: usize,
    past: usize,
}

impl candle_core::InplaceOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "dialora-causal-softmax"
    }
    fn cpu_fwd(&self, st: &mut CpuStorage, l: &Layout) -> Result<()> {
        use rayon::prelude::*;
        let cols = self.past + self.t;
        let data = f32_mut(st, l)?;
        let sc = self.scale as f32;
        data.par_chunks_mut(cols * par_rows(cols))
            .enumerate()
            .for_each(|(c, block)| {
                for (k, row) in block.chunks_mut(cols).enumerate() {
                    let r = c * par_rows(cols) + k;
                    let seen = self.past + r % self.t + 1;
                    let (live, masked) = row.split_at_mut(seen);
                    softmax_row(live, sc);
                    masked.fill(0.0);
                }
            });
        Ok(())
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, st: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        use candle_core::backend::BackendStorage;
        let cols = self.past + self.t;
        let rows = l.shape().elem_count() / cols;
        let s = cuda::slice(st, l)?;
        let (c, t, p, sc) = (
            cols as i32,
            self.t as i32,
            self.past as i32,
            self.scale as f32,
        );
        launch!(st.device(), "causal_softmax", st.dtype(), cuda::per_row(rows); [&s]; [&c, &t, &p, &sc]);
        Ok(())
    }
}

/// Softmax over the last dim (candle's fused kernel), computed in f32 for half-precision
/// inputs.
pub fn softmax_last_dim(s: &Tensor) -> Result<Tensor> {
    match s.dtype() {
        DType::F32 => candle_nn::ops::softmax_last_dim(s),
        DType::F64 => candle_nn::ops::softmax(s, D::Minus1),
        dt => candle_nn::ops::softmax_last_dim(&s.to_dtype(DType::F32)?)?.to_dtype(dt),
    }
}

/// Additive causal mask `[rows, past + t]` for `t` new positions after `past` cached ones,
/// repeated `rep` times along the rows (grouped-query heads folded into the row dim). Built
/// once per shape and device and reused (every layer and step of a run asks for the same one).
pub fn causal_mask(
    t: usize,
    past: usize,
    rep: usize,
    dtype: DType,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    type Key = (usize, usize, usize, DType, candle_core::DeviceLocation);
    thread_local! {
        static LAST: std::cell::RefCell<Option<(Key, Tensor)>> = const { std::cell::RefCell::new(None) };
    }
    let key: Key = (t, past, rep, dtype, dev.location());
    if let Some(m) = LAST.with(|l| {
        l.borrow()
            .as_ref()
            .filter(|(k, _)| *k == key)
            .map(|(_, m)| m.clone())
    }) {
        return Ok(m);
    }
    let cols = past + t;
    let mut v = Vec::with_capacity(rep * t * cols);
    for _ in 0..rep {
        for i in 0..t {
            for j in 0..cols {
                v.push(if j > past + i { f32::NEG_INFINITY } else { 0.0 });
            }
        }
    }
    let m = Tensor::from_vec(v, (rep * t, cols), dev)?.to_dtype(dtype)?;
    LAST.with(|l| *l.borrow_mut() = Some((key, m.clone())));
    Ok(m)
}

// ---------------------------------------------------------------------------------------------
// Softmax backward

/// Softmax backward: `dS = scale * P * (dP - sum(P * dP))` over the last dim; `scale` is the
/// factor the scores were multiplied by before the softmax. The custom op writes over `dp` in
/// place (so `dp` must own its storage).
pub fn softmax_backward(p: &Tensor, dp: Tensor, scale: f64) -> Result<Tensor> {
    if fused(&[p, &dp]) && p.dims() == dp.dims() {
        dp.inplace_op2(p, &SoftmaxBackward { scale })?;
        return Ok(dp);
    }
    softmax_backward_generic(p, &dp)? * scale
}

/// Softmax backward from candle ops (without the scale).
pub fn softmax_backward_generic(p: &Tensor, dp: &Tensor) -> Result<Tensor> {
    let dt = p.dtype();
    let up = |t: &Tensor| match dt {
        DType::F64 | DType::F32 => Ok(t.clone()),
        _ => t.to_dtype(DType::F32),
    };
    let (p, dp) = (up(p)?, up(dp)?);
    let dot = (&p * &dp)?.sum_keepdim(D::Minus1)?;
    (p * dp.broadcast_sub(&dot)?)?.to_dtype(dt)
}

struct SoftmaxBackward {
    scale: f64,
}

impl candle_core::InplaceOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "dialora-softmax-backward"
    }
    fn cpu_fwd(&self, st: &mut CpuStorage, l: &Layout, ps: &CpuStorage, pl: &Layout) -> Result<()> {
        use rayon::prelude::*;
        let d = last_dim(l);
        let dps = f32_mut(st, l)?;
        let ps = f32_slice(ps, pl)?;
        let sc = self.scale as f32;
        let rows = par_rows(d);
        dps.par_chunks_mut(d * rows)
            .enumerate()
            .for_each(|(c, block)| {
                for (k, dr) in block.chunks_mut(d).enumerate() {
                    let i = (c * rows + k) * d;
                    let pr = &ps[i..i + d];
                    let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                    for (g, &pj) in dr.iter_mut().zip(pr) {
                        *g = sc * pj * (*g - dot);
                    }
                }
            });
        Ok(())
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        st: &mut candle_core::CudaStorage,
        l: &Layout,
        ps: &candle_core::CudaStorage,
        pl: &Layout,
    ) -> Result<()> {
        use candle_core::backend::BackendStorage;
        let d = last_dim(l);
        let rows = l.shape().elem_count() / d;
        let (dp, p) = (cuda::slice(st, l)?, cuda::slice(ps, pl)?);
        let (c, sc) = (d as i32, self.scale as f32);
        launch!(st.device(), "softmax_backward", st.dtype(), cuda::per_row(rows); [&dp, &p]; [&c, &sc]);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// RMSNorm forward: `x / sqrt(mean(x^2) + eps) * w` over the last dim (candle's fused kernel;
/// f64 through candle's plain ops).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if x.dtype() == DType::F64 {
        return candle_nn::ops::rms_norm_slow(x, w, eps as f32);
    }
    candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)
}

/// RMSNorm backward with respect to `x` (the weight is frozen), accumulated in f32 (f64 on the
/// CPU body).
pub fn rms_norm_backward(x: &Tensor, w: &Tensor, eps: f64, dy: &Tensor) -> Result<Tensor> {
    if fused(&[x, w, dy]) {
        return x.apply_op3_no_bwd(w, dy, &RmsNormBackward { eps });
    }
    rms_norm_backward_generic(x, w, eps, dy)
}

/// RMSNorm backward from candle ops (any device and dtype).
pub fn rms_norm_backward_generic(x: &Tensor, w: &Tensor, eps: f64, dy: &Tensor) -> Result<Tensor> {
    let dt = x.dtype();
    let up = |t: &Tensor| {
        if dt == DType::F64 {
            Ok(t.clone())
        } else {
            t.to_dtype(DType::F32)
        }
    };
    let (x, w, dy) = (up(x)?, up(w)?, up(dy)?);
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?; // [N,1]
    let xhat = x.broadcast_mul(&r)?;
    let g = dy.broadcast_mul(&w)?;
    let m = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
    let dx = (g - xhat.broadcast_mul(&m)?)?.broadcast_mul(&r)?;
    dx.to_dtype(dt)
}

struct RmsNormBackward {
    eps: f64,
}

impl candle_core::CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "dialora-rms-norm-backward"
    }
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let d = last_dim(xl);
        let (xs, ws, dys) = (f32_slice(xs, xl)?, f32_slice(ws, wl)?, f32_slice(dys, dyl)?);
        let eps = self.eps;
        let mut out = vec![0f32; xs.len()];
        let rows = par_rows(d);
        out.par_chunks_mut(d * rows).enumerate().for_each(|(c, o)| {
            for (k, orow) in o.chunks_mut(d).enumerate() {
                let i = (c * rows + k) * d;
                let (xr, dr) = (&xs[i..i + d], &dys[i..i + d]);
                let ms: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / d as f64;
                let r = 1.0 / (ms + eps).sqrt();
                let dot: f64 = (0..d)
                    .map(|j| (dr[j] * ws[j]) as f64 * (xr[j] as f64 * r))
                    .sum::<f64>()
                    / d as f64;
                for j in 0..d {
                    let xhat = xr[j] as f64 * r;
                    orow[j] = (r * ((dr[j] * ws[j]) as f64 - xhat * dot)) as f32;
                }
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        dys: &candle_core::CudaStorage,
        dyl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let d = last_dim(xl);
        let n = xl.shape().elem_count();
        let out = cuda::output(xs.device(), xs.dtype(), n)?;
        {
            let (x, w, dy) = (
                cuda::slice(xs, xl)?,
                cuda::slice(ws, wl)?,
                cuda::slice(dys, dyl)?,
            );
            let o = cuda::full(&out)?;
            let (dd, eps) = (d as i32, self.eps as f32);
            launch!(xs.device(), "rms_norm_backward", xs.dtype(), cuda::per_row(n / d);
                [&x, &w, &dy, &o]; [&dd, &eps]);
        }
        Ok((out, xl.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE

/// Rotary embedding (HF rotate-half layout) of `x: [B, H, T, hd]` with tables `[T, hd/2]`
/// (candle's fused kernel; f64 through candle's plain ops).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F64 {
        return candle_nn::rotary_emb::rope_slow(&x.contiguous()?, cos, sin);
    }
    candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)
}

/// RoPE is a rotation: its backward is the rotation by the opposite angle.
pub fn rope_backward(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope(dy, cos, &sin.neg()?)
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

/// SwiGLU: `silu(g) * u`.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if fused(&[g, u]) && g.dims() == u.dims() {
        return g.apply_op2_no_bwd(u, &Swiglu);
    }
    swiglu_generic(g, u)
}

/// SwiGLU from candle ops.
pub fn swiglu_generic(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    g.silu()? * u
}

struct Swiglu;

impl candle_core::CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "dialora-swiglu"
    }
    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (gs, us) = (f32_slice(gs, gl)?, f32_slice(us, ul)?);
        let mut out = vec![0f32; gs.len()];
        super::team::par_chunks_mut(&mut out, PAR_ELEMS, |base, o| {
            let (g, u) = (&gs[base..base + o.len()], &us[base..base + o.len()]);
            #[cfg(target_arch = "x86_64")]
            if super::matmul::simd() >= super::matmul::Simd::Avx2 {
                // SAFETY: AVX2 and FMA were detected
                return unsafe { avx::swiglu(g, u, o) };
            }
            for ((v, &x), &u) in o.iter_mut().zip(g).zip(u) {
                *v = x / (1.0 + (-x).exp()) * u;
            }
        });
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        us: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let n = gl.shape().elem_count();
        let out = cuda::output(gs.device(), gs.dtype(), n)?;
        {
            let (g, u, o) = (
                cuda::slice(gs, gl)?,
                cuda::slice(us, ul)?,
                cuda::full(&out)?,
            );
            let nn = n as i64;
            launch!(gs.device(), "swiglu", gs.dtype(), cuda::per_elem(n); [&g, &u, &o]; [&nn]);
        }
        Ok((out, gl.shape().clone()))
    }
}

/// SwiGLU backward: returns (dg, du).
pub fn swiglu_backward(g: &Tensor, u: &Tensor, da: &Tensor) -> Result<(Tensor, Tensor)> {
    if fused(&[g, u, da]) && g.dims() == u.dims() && g.dims() == da.dims() {
        // the op's output is [dg; du] stacked along a new first dim
        let both = g.apply_op3_no_bwd(u, da, &SwigluBackward)?;
        return Ok((both.get(0)?, both.get(1)?));
    }
    swiglu_backward_generic(g, u, da)
}

/// SwiGLU backward from candle ops.
pub fn swiglu_backward_generic(g: &Tensor, u: &Tensor, da: &Tensor) -> Result<(Tensor, Tensor)> {
    let sig = candle_nn::ops::sigmoid(g)?;
    let silu = (g * &sig)?;
    let du = (da * &silu)?;
    // d silu / dg = sig * (1 + g * (1 - sig))
    let one_minus = sig.affine(-1.0, 1.0)?;
    let dsilu = (&sig * (g * one_minus)?.affine(1.0, 1.0)?)?;
    let dg = ((da * u)? * dsilu)?;
    Ok((dg, du))
}

struct SwigluBackward;

fn stacked2(s: &Shape) -> Shape {
    let mut d = vec![2];
    d.extend_from_slice(s.dims());
    Shape::from(d)
}

impl candle_core::CustomOp3 for SwigluBackward {
    fn name(&self) -> &'static str {
        "dialora-swiglu-backward"
    }
    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        das: &CpuStorage,
        dal: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (gs, us, das) = (f32_slice(gs, gl)?, f32_slice(us, ul)?, f32_slice(das, dal)?);
        let n = gs.len();
        let mut out = vec![0f32; 2 * n];
        let (dg, du) = out.split_at_mut(n);
        dg.par_chunks_mut(PAR_ELEMS)
            .zip(du.par_chunks_mut(PAR_ELEMS))
            .enumerate()
            .for_each(|(c, (dgc, duc))| {
                let base = c * PAR_ELEMS;
                for j in 0..dgc.len() {
                    let (x, uu, d) = (gs[base + j], us[base + j], das[base + j]);
                    let sig = 1.0 / (1.0 + (-x).exp());
                    duc[j] = d * x * sig;
                    dgc[j] = d * uu * sig * (1.0 + x * (1.0 - sig));
                }
            });
        Ok((CpuStorage::F32(out), stacked2(gl.shape())))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        us: &candle_core::CudaStorage,
        ul: &Layout,
        das: &candle_core::CudaStorage,
        dal: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let n = gl.shape().elem_count();
        let out = cuda::output(gs.device(), gs.dtype(), 2 * n)?;
        {
            let (g, u, da) = (
                cuda::slice(gs, gl)?,
                cuda::slice(us, ul)?,
                cuda::slice(das, dal)?,
            );
            let o = cuda::full(&out)?;
            let nn = n as i64;
            launch!(gs.device(), "swiglu_backward", gs.dtype(), cuda::per_elem(n);
                [&g, &u, &da, &o]; [&nn]);
        }
        Ok((out, stacked2(gl.shape())))
    }
}

// ---------------------------------------------------------------------------------------------
// Dropout

/// The dropout mask of one LoRA module at one micro-step (values 0 or 1/(1-p)): a counter-based
/// generator, element `i`'s value a pure function of (seed, micro-step, module, i), computed
/// the same way by the CPU body, the CUDA kernel (`mask_value` in kernels/ops.cu) and the
/// reference. So the backward and a resumed run regenerate exactly the mask the forward used,
/// no mask is stored, and no random numbers travel from the host to a device.
///
/// One 64-bit hash (SplitMix64's finaliser of `stream + (i / 4) * golden`) gives four 16-bit
/// uniforms, one per element of a group of four; an element is dropped when its uniform is
/// below `p * 65536` (drop probability resolution 1/65536).
#[derive(Debug, Clone, Copy)]
pub struct DropoutMask {
    stream: u64,
    threshold: u32,
    keep: f32,
}

impl DropoutMask {
    /// The mask of module `module` at micro-step `micro_step` of a run seeded `seed`, for drop
    /// probability `p`.
    pub fn new(seed: u64, micro_step: u64, module: usize, p: f64) -> Self {
        Self {
            stream: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ micro_step.wrapping_mul(0xBF58_476D_1CE4_E5B9)
                ^ (module as u64).wrapping_mul(0x94D0_49BB_1331_11EB),
            threshold: (p * 65536.0).round() as u32,
            keep: (1.0 / (1.0 - p)) as f32,
        }
    }

    fn hash(&self, group: u64) -> u64 {
        let mut z = self
            .stream
            .wrapping_add(group.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The mask value of element `i`.
    pub fn value(&self, i: usize) -> f32 {
        let u = ((self.hash((i >> 2) as u64) >> (16 * (i & 3))) & 0xFFFF) as u32;
        if u < self.threshold {
            0.0
        } else {
            self.keep
        }
    }

    /// `g(i, &mut out[i], mask[i])` for every element, in parallel chunks (one hash per group
    /// of four elements).
    fn apply(&self, out: &mut [f32], g: impl Fn(usize, &mut f32, f32) + Sync) {
        use rayon::prelude::*;
        out.par_chunks_mut(PAR_ELEMS)
            .enumerate()
            .for_each(|(c, o)| {
                let base = c * PAR_ELEMS; // a multiple of 4: groups never straddle chunks
                for (q, quad) in o.chunks_mut(4).enumerate() {
                    let h = self.hash(((base >> 2) + q) as u64);
                    for (k, v) in quad.iter_mut().enumerate() {
                        let u = ((h >> (16 * k)) & 0xFFFF) as u32;
                        let m = if u < self.threshold { 0.0 } else { self.keep };
                        g(base + 4 * q + k, v, m);
                    }
                }
            });
    }

    /// The mask as a tensor (the reference path; built on the host).
    pub fn tensor(
        &self,
        dims: &[usize],
        dtype: DType,
        dev: &candle_core::Device,
    ) -> Result<Tensor> {
        let mut v = vec![0f32; dims.iter().product()];
        self.apply(&mut v, |_, o, m| *o = m);
        Tensor::from_vec(v, dims, dev)?.to_dtype(dtype)
    }

    #[cfg(feature = "cuda")]
    fn cuda_args(&self) -> (u64, u32, f32) {
        (self.stream, self.threshold, self.keep)
    }
}

/// `dropout(x)` with `mask`.
pub fn dropout(x: &Tensor, mask: DropoutMask) -> Result<Tensor> {
    if fused(&[x]) {
        return x.apply_op1_no_bwd(&Dropout(mask));
    }
    x * mask.tensor(x.dims(), x.dtype(), x.device())?
}

/// `acc + dropout(t)` with `mask`; the custom op adds in place (so `acc` must own its storage,
/// as for `matmul::matmul_acc`).
pub fn add_dropped(acc: Tensor, t: &Tensor, mask: DropoutMask) -> Result<Tensor> {
    let t = t.contiguous()?;
    if fused(&[&acc, &t]) && acc.dims() == t.dims() {
        acc.inplace_op2(&t, &AddDropped(mask))?;
        return Ok(acc);
    }
    let m = mask.tensor(t.dims(), t.dtype(), t.device())?;
    acc + (t * m)?
}

struct Dropout(DropoutMask);

impl candle_core::CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "dialora-dropout"
    }
    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let xs = f32_slice(st, l)?;
        let mut out = vec![0f32; xs.len()];
        self.0.apply(&mut out, |i, o, m| *o = xs[i] * m);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        st: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let n = l.shape().elem_count();
        let out = cuda::output(st.device(), st.dtype(), n)?;
        {
            let (x, o) = (cuda::slice(st, l)?, cuda::full(&out)?);
            let (stream, threshold, keep) = self.0.cuda_args();
            let nn = n as i64;
            launch!(st.device(), "dropout", st.dtype(), cuda::per_elem(n);
                [&x, &o]; [&nn, &stream, &threshold, &keep]);
        }
        Ok((out, l.shape().clone()))
    }
}

struct AddDropped(DropoutMask);

impl candle_core::InplaceOp2 for AddDropped {
    fn name(&self) -> &'static str {
        "dialora-add-dropped"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        src: &CpuStorage,
        sl: &Layout,
    ) -> Result<()> {
        let (d, s) = (f32_mut(dst, dl)?, f32_slice(src, sl)?);
        if d.len() != s.len() {
            candle_core::bail!("add_dropped: {} vs {} elements", d.len(), s.len());
        }
        self.0.apply(d, |i, o, m| *o += s[i] * m);
        Ok(())
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dl: &Layout,
        src: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<()> {
        use candle_core::backend::BackendStorage;
        let n = dl.shape().elem_count();
        let (acc, t) = (cuda::slice(dst, dl)?, cuda::slice(src, sl)?);
        let (stream, threshold, keep) = self.0.cuda_args();
        let nn = n as i64;
        launch!(dst.device(), "add_dropped", dst.dtype(), cuda::per_elem(n);
            [&acc, &t]; [&nn, &stream, &threshold, &keep]);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy

/// Token cross-entropy over rows of logits `[rows, V]` against `targets` (`[rows]` u32, on the
/// logits' device): returns the per-row losses (`[rows]` f32, on the device) and, when `scale`
/// is given, the gradient `scale * (softmax(x) - onehot(target))`. The custom op computes both
/// in one pass per row and writes the gradient over the logits in place (so `logits` must own
/// its storage: a fresh matmul result); accumulation is in f32 (f64 in the CPU body).
pub fn cross_entropy(
    logits: Tensor,
    targets: &Tensor,
    scale: Option<f64>,
) -> Result<(Tensor, Option<Tensor>)> {
    let (rows, _) = logits.dims2()?;
    if targets.dims() != [rows] {
        candle_core::bail!(
            "cross_entropy: targets {:?} for {rows} rows",
            targets.dims()
        );
    }
    if fused(&[&logits]) && targets.is_contiguous() {
        let op = CrossEntropy {
            scale,
            losses: std::sync::Mutex::new(None),
        };
        logits.inplace_op2(&targets.to_dtype(DType::U32)?, &op)?;
        let losses = op.losses.into_inner().ok().flatten();
        let Some(losses) = losses else {
            candle_core::bail!("cross_entropy: the kernel returned no losses");
        };
        return Ok((losses, scale.map(|_| logits)));
    }
    cross_entropy_generic(&logits, targets, scale)
}

/// Cross-entropy from candle ops (any device; f32 accumulation for half precision).
pub fn cross_entropy_generic(
    logits: &Tensor,
    targets: &Tensor,
    scale: Option<f64>,
) -> Result<(Tensor, Option<Tensor>)> {
    let dt = logits.dtype();
    let logits = if dt == DType::F64 {
        logits.clone()
    } else {
        logits.to_dtype(DType::F32)?
    };
    let tgt = targets.to_dtype(DType::U32)?.unsqueeze(1)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let losses = (lse.clone() - shifted.gather(&tgt, 1)?)?.squeeze(1)?;
    let grad = match scale {
        Some(scale) => {
            let p = shifted.broadcast_sub(&lse)?.exp()?;
            let minus = Tensor::full(-1f32, tgt.dims(), p.device())?.to_dtype(p.dtype())?;
            Some((p.scatter_add(&tgt, &minus, 1)? * scale)?.to_dtype(dt)?)
        }
        None => None,
    };
    let losses = if dt == DType::F64 {
        losses
    } else {
        losses.to_dtype(DType::F32)?
    };
    Ok((losses, grad))
}

struct CrossEntropy {
    scale: Option<f64>,
    /// The per-row losses the kernel computed (the op's second output).
    losses: std::sync::Mutex<Option<Tensor>>,
}

impl candle_core::InplaceOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "dialora-cross-entropy"
    }
    fn cpu_fwd(&self, st: &mut CpuStorage, l: &Layout, ts: &CpuStorage, tl: &Layout) -> Result<()> {
        use rayon::prelude::*;
        let v = last_dim(l);
        let targets = match (ts, tl.contiguous_offsets()) {
            (CpuStorage::U32(t), Some((a, b))) => &t[a..b],
            _ => candle_core::bail!("cross_entropy: contiguous u32 targets only"),
        };
        let data = f32_mut(st, l)?;
        let mut losses = vec![0f32; targets.len()];
        let scale = self.scale;
        data.par_chunks_mut(v)
            .zip(losses.par_iter_mut())
            .zip(targets.par_iter())
            .for_each(|((row, loss), &t)| {
                let t = t as usize;
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let picked = row[t];
                let Some(scale) = scale else {
                    let sum: f64 = row.iter().map(|&x| ((x - max).exp()) as f64).sum();
                    *loss = (max as f64 + sum.ln() - picked as f64) as f32;
                    return;
                };
                let mut sum = 0f64;
                for x in row.iter_mut() {
                    let e = (*x - max).exp();
                    *x = e;
                    sum += e as f64;
                }
                *loss = (max as f64 + sum.ln() - picked as f64) as f32;
                let f = (scale / sum) as f32;
                row.iter_mut().for_each(|g| *g *= f);
                row[t] -= scale as f32;
            });
        let losses = Tensor::from_vec(losses, targets.len(), &candle_core::Device::Cpu)?;
        *self.losses.lock().unwrap() = Some(losses);
        Ok(())
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        st: &mut candle_core::CudaStorage,
        l: &Layout,
        ts: &candle_core::CudaStorage,
        tl: &Layout,
    ) -> Result<()> {
        use candle_core::backend::BackendStorage;
        let v = last_dim(l);
        let rows = l.shape().elem_count() / v;
        let dev = st.device().clone();
        let losses = dev.alloc_zeros::<f32>(rows)?;
        {
            let Some((a, b)) = tl.contiguous_offsets() else {
                candle_core::bail!("cross_entropy: contiguous targets only");
            };
            let targets = ts.as_cuda_slice::<u32>()?.slice(a..b);
            let x = cuda::slice(st, l)?;
            let (vv, scale, write) = (
                v as i32,
                self.scale.unwrap_or(0.0) as f32,
                self.scale.is_some() as i32,
            );
            launch!(dev, "cross_entropy", st.dtype(), cuda::per_row(rows);
                [&x]; [&targets, &losses, &vv, &scale, &write]);
        }
        let storage = candle_core::CudaStorage::wrap_cuda_slice(losses, dev);
        let t = Tensor::from_storage(
            candle_core::Storage::Cuda(storage),
            rows,
            candle_core::op::BackpropOp::none(),
            false,
        );
        *self.losses.lock().unwrap() = Some(t);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    /// `exp8` against `f32::exp` (within 2 ulp where the result is normal, 0 below the
    /// normal range, inf above `ln(f32::MAX)`, NaN for NaN), and the eight-lane softmax and
    /// SwiGLU against the scalar ones for every tail length.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_exponential_softmax_and_swiglu_are_the_scalar_ones() {
        use super::avx::{exp8, row, swiglu};
        use std::arch::x86_64::*;
        if super::super::matmul::simd() < super::super::matmul::Simd::Avx2 {
            eprintln!("no AVX2 and FMA here: nothing to compare");
            return;
        }
        let exp = |v: [f32; 8]| -> [f32; 8] {
            let mut out = [0f32; 8];
            // SAFETY: AVX2 and FMA were detected
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), exp8(_mm256_loadu_ps(v.as_ptr()))) };
            out
        };
        let ulps = |a: f32, b: f32| (a.to_bits() as i64 - b.to_bits() as i64).abs();
        let mut worst = 0;
        let mut x = -87.0f32;
        while x < 88.7 {
            let v: [f32; 8] = std::array::from_fn(|i| x + i as f32 * 0.001_37);
            for (got, want) in exp(v).iter().zip(v.map(f32::exp)) {
                worst = worst.max(ulps(*got, want));
            }
            x += 0.0173;
        }
        assert!(worst <= 2, "exp8 is {worst} ulp from f32::exp");
        let edge = exp([
            -1e30,
            -88.0,
            f32::NEG_INFINITY,
            89.0,
            f32::INFINITY,
            f32::NAN,
            0.0,
            88.7,
        ]);
        assert_eq!(&edge[..5], &[0.0, 0.0, 0.0, f32::INFINITY, f32::INFINITY]);
        assert!(edge[5].is_nan() && edge[6] == 1.0 && ulps(edge[7], 88.7f32.exp()) <= 2);

        let mut seed = 7u64;
        let mut rand = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 40) as f32 / (1u64 << 24) as f32 * 40.0 - 20.0
        };
        for n in [1usize, 2, 7, 8, 9, 15, 16, 17, 100, 1000] {
            let s: Vec<f32> = (0..n).map(|_| rand()).collect();
            let mut scalar = s.clone();
            let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) * 0.3;
            let sum: f64 = s.iter().map(|&x| ((x * 0.3 - max) as f64).exp()).sum();
            scalar
                .iter_mut()
                .for_each(|x| *x = (((*x * 0.3 - max) as f64).exp() / sum) as f32);
            let mut vector = s.clone();
            // SAFETY: AVX2 and FMA were detected
            unsafe { row(&mut vector, 0.3) };
            let d = vector
                .iter()
                .zip(&scalar)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-6, "softmax of {n}: {d} from the f64 one");
            let total: f32 = vector.iter().sum();
            assert!((total - 1.0).abs() < 1e-5, "softmax of {n} sums to {total}");
        }
        // SwiGLU: the scalar formula's values to rounding, for every tail length; a value's
        // result does not depend on where it falls (vector or tail)
        let g: Vec<f32> = (0..37).map(|_| rand() * 5.0).collect();
        let u: Vec<f32> = (0..37).map(|_| rand()).collect();
        let mut whole = vec![0f32; 37];
        // SAFETY: AVX2 and FMA were detected
        unsafe { swiglu(&g, &u, &mut whole) };
        for (i, ((&x, &u), &v)) in g.iter().zip(&u).zip(&whole).enumerate() {
            let want = (x as f64 / (1.0 + (-x as f64).exp()) * u as f64) as f32;
            assert!(
                (v - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{i}: {v} vs {want}"
            );
        }
        for start in [0usize, 3, 8, 30] {
            let mut part = vec![0f32; 37 - start];
            // SAFETY: as above
            unsafe { swiglu(&g[start..], &u[start..], &mut part) };
            assert_eq!(part, whole[start..], "from {start}");
        }
    }
}
