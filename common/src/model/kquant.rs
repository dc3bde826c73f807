//! The products of decode and prefill with a k-quant weight (Q4_K, Q6_K: the rows of a q4_k
//! model that are a multiple of 256 long, `down_proj` in SmolLM2) by candle's own kernels,
//! on a step's threads: the input rows quantized to the type's `VecDotType` (Q8_K) by candle's
//! `from_float`, each output candle's `vec_dot` of one weight row and one input row.
//!
//! candle's `QMatMul` runs the same kind of kernels on a thread pool of its own; inside a step,
//! whose threads spin between their parallel loops (`team`), its workers and the step's took
//! turns on the cores. Here blocks of weight rows go to the step's threads (`team::par_for`),
//! each weight row is read from memory once for all the input rows (asked for ahead, as the
//! other kernels do), and every output is one `vec_dot`, whatever the other rows.

use super::matmul::{prefetch_span, SERIAL_BELOW};
use candle_core::quantized::k_quants::{BlockQ4K, BlockQ6K, GgmlType};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, Tensor};

/// A k-quant weight `[n, k]` as candle's blocks, row after row.
pub struct KRows {
    blocks: Blocks,
    n: usize,
    k: usize,
}

enum Blocks {
    Q4K(Vec<BlockQ4K>),
    Q6K(Vec<BlockQ6K>),
}

/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 16;

impl KRows {
    /// Whether `from_qtensor` takes a tensor of type `ty` on `dev`.
    pub fn takes(ty: GgmlDType, dev: &candle_core::Device) -> bool {
        dev.is_cpu() && matches!(ty, GgmlDType::Q4K | GgmlDType::Q6K)
    }

    /// From a quantized tensor of candle's `Q4K` or `Q6K` type (`[n, k]`, `k` a multiple of
    /// 256).
    pub fn from_qtensor(q: &QTensor) -> Result<Self> {
        let (n, k) = q.shape().dims2()?;
        let data = q.data()?;
        let blocks = match q.dtype() {
            GgmlDType::Q4K => Blocks::Q4K(from_bytes(&data, n, k)?),
            GgmlDType::Q6K => Blocks::Q6K(from_bytes(&data, n, k)?),
            other => candle_core::bail!("KRows takes Q4K or Q6K tensors, not {other:?}"),
        };
        Ok(KRows { blocks, n, k })
    }

    /// Bytes the weight takes.
    pub fn bytes(&self) -> usize {
        match &self.blocks {
            Blocks::Q4K(b) => std::mem::size_of_val(b.as_slice()),
            Blocks::Q6K(b) => std::mem::size_of_val(b.as_slice()),
        }
    }

    /// `x·Wᵀ` for `x: [m, k]` in f32 on the CPU.
    pub fn product(&self, x: &Tensor) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        if k != self.k {
            candle_core::bail!("k-quant product: [{m}, {k}] x [{}, {}]ᵀ", self.n, self.k);
        }
        let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let out = match &self.blocks {
            Blocks::Q4K(w) => product(w, (self.n, k), &xv, m),
            Blocks::Q6K(w) => product(w, (self.n, k), &xv, m),
        };
        Tensor::from_vec(out, (m, self.n), x.device())
    }
}

/// candle's blocks of type `T` from a quantized tensor's bytes (`[n, k]`).
fn from_bytes<T: GgmlType>(data: &[u8], n: usize, k: usize) -> Result<Vec<T>> {
    let size = std::mem::size_of::<T>();
    if !k.is_multiple_of(T::BLCK_SIZE) || data.len() != n * k / T::BLCK_SIZE * size {
        candle_core::bail!("{:?} data of {} bytes for [{n}, {k}]", T::DTYPE, data.len());
    }
    let mut blocks = vec![T::zeros(); n * k / T::BLCK_SIZE];
    // SAFETY: candle's block types are `repr(C)` plain bytes and numbers (`zeros` makes them
    // from zero bytes) and their storage is those blocks' bytes, `size` each; the lengths
    // match (checked above)
    unsafe {
        std::ptr::copy_nonoverlapping(data.as_ptr(), blocks.as_mut_ptr() as *mut u8, data.len())
    };
    Ok(blocks)
}

/// `out[i·n + j] = vec_dot(w_j, x_i)` for the `m` rows of `x` quantized by candle to
/// `T::VecDotType`.
fn product<T: GgmlType>(w: &[T], (n, k): (usize, usize), x: &[f32], m: usize) -> Vec<f32> {
    let (kb, xb) = (k / T::BLCK_SIZE, k / T::VecDotType::BLCK_SIZE);
    let mut xq = vec![T::VecDotType::zeros(); m * xb];
    for (row, q) in x.chunks_exact(k).zip(xq.chunks_exact_mut(xb)) {
        T::VecDotType::from_float(row, q);
    }
    let mut out = vec![0f32; m * n];
    let dst = super::matmul::Dst(out.as_mut_ptr());
    let row_bytes = kb * std::mem::size_of::<T>();
    let run = |t: usize| {
        let rows = t * ROWS_PER_TASK..((t + 1) * ROWS_PER_TASK).min(n);
        for j in rows {
            let wj = &w[j * kb..(j + 1) * kb];
            prefetch_span(wj.as_ptr() as *const u8, row_bytes);
            for i in 0..m {
                let v = T::vec_dot(k, wj, &xq[i * xb..(i + 1) * xb]);
                // SAFETY: (i, j) is inside the m × n output; row j belongs to this task
                unsafe { *dst.ptr().add(i * n + j) = v };
            }
        }
    };
    let tasks = n.div_ceil(ROWS_PER_TASK);
    if m * n * k < SERIAL_BELOW {
        (0..tasks).for_each(run);
    } else {
        super::team::par_for(tasks, run);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module};

    /// The products are candle's `QMatMul`'s (the same `vec_dot` per output, or its repacked
    /// kernels, to rounding), and a row's results do not depend on the other rows.
    #[test]
    fn k_quant_products_are_candles_and_each_rows_own() {
        let dev = Device::Cpu;
        for ty in [GgmlDType::Q4K, GgmlDType::Q6K] {
            let w = Tensor::randn(0f32, 0.05, (48, 512), &dev).unwrap();
            let x = Tensor::randn(0f32, 1.0, (9, 512), &dev).unwrap();
            let q = QTensor::quantize(&w, ty).unwrap();
            let rows = KRows::from_qtensor(&q).unwrap();
            assert_eq!(rows.bytes(), q.storage_size_in_bytes());
            let got = rows.product(&x).unwrap();
            let wq = q.dequantize(&dev).unwrap();
            let want = QMatMul::from_qtensor(q).unwrap().forward(&x).unwrap();
            let d = crate::testing::max_abs_diff(&got, &want);
            assert!(d < 1e-3, "{ty:?}: {d} from QMatMul");
            // and the product of the dequantized weight, to the input's 8-bit rounding
            let exact = x.matmul(&wq.t().unwrap()).unwrap();
            let e = crate::testing::max_abs_diff(&got, &exact);
            assert!(
                e < 0.05,
                "{ty:?}: {e} from the dequantized weight's product"
            );
            for (s, n) in [(0usize, 1usize), (4, 3), (8, 1)] {
                let part = rows.product(&x.narrow(0, s, n).unwrap()).unwrap();
                let all = got.narrow(0, s, n).unwrap();
                let bits = |t: &Tensor| -> Vec<u32> {
                    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                    v.iter().map(|v| v.to_bits()).collect()
                };
                assert_eq!(bits(&part), bits(&all), "{ty:?} rows {s}+{n}");
            }
        }
        let f = QTensor::quantize(
            &Tensor::zeros((4, 64), candle_core::DType::F32, &dev).unwrap(),
            GgmlDType::Q8_0,
        )
        .unwrap();
        assert!(KRows::from_qtensor(&f).is_err());
    }
}
