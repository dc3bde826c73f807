//! A frozen linear layer with an optional LoRA branch:
//! `y = x W^T (+ b) + scale * B(A(dropout(x)))`.
//!
//! Only the LoRA matrices get gradients; for the frozen weight the backward computes the input
//! gradient alone (`dx = dy W`), never `dW`.

use super::q8::{products_of, Q8Input, QRows};
use super::{matmul, ops, Grads, TrainCtx};
use candle_core::{Result, Tensor};

/// The trainable part of a LoRA linear layer.
#[derive(Clone)]
pub struct Lora {
    /// Index of this module among the model's LoRA modules (gradients and dropout streams).
    pub id: usize,
    /// `[r, in]`, master precision (f32, or f64 in gradient tests).
    pub a: Tensor,
    /// `[out, r]`, master precision.
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f64,
    /// `a` and `b` in the compute dtype, made once per value of `a`/`b` (once per optimizer
    /// step), not in every forward and backward.
    pub cast: CastCache,
}

/// The last compute-dtype copies of a LoRA pair, keyed by the master tensors' ids: `(A, B)`
/// for training and the one-sequence forward, and `(A, Bᵀ)` for a batched step's rows.
#[derive(Clone, Default)]
pub struct CastCache(
    std::sync::Arc<std::sync::Mutex<Option<Cast>>>,
    std::sync::Arc<std::sync::Mutex<Option<Cast>>>,
);

struct Cast {
    ids: (candle_core::TensorId, candle_core::TensorId),
    a: Tensor,
    b: Tensor,
}

impl Lora {
    /// `(A, B)` in dtype `dt`: the masters themselves when they are in `dt`, else copies cast
    /// once and reused until the optimizer replaces the masters.
    pub fn factors(&self, dt: candle_core::DType) -> Result<(Tensor, Tensor)> {
        if self.a.dtype() == dt && self.b.dtype() == dt {
            return Ok((self.a.clone(), self.b.clone()));
        }
        self.cached(&self.cast.0, dt, || {
            Ok((self.a.to_dtype(dt)?, self.b.to_dtype(dt)?))
        })
    }

    /// `(A, Bᵀ)` in dtype `dt`, `Bᵀ` `[r, out]` contiguous: what a batched step's rows take
    /// (`matmul::add_lora_rows`), made once per value of the masters (once per adapter when
    /// serving).
    pub fn row_factors(&self, dt: candle_core::DType) -> Result<(Tensor, Tensor)> {
        self.cached(&self.cast.1, dt, || {
            Ok((
                self.a.to_dtype(dt)?,
                self.b.to_dtype(dt)?.t()?.contiguous()?,
            ))
        })
    }

    /// The pair in `slot` when it was made from these masters in dtype `dt`, else `make`'s,
    /// kept there.
    fn cached(
        &self,
        slot: &std::sync::Mutex<Option<Cast>>,
        dt: candle_core::DType,
        make: impl FnOnce() -> Result<(Tensor, Tensor)>,
    ) -> Result<(Tensor, Tensor)> {
        let ids = (self.a.id(), self.b.id());
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = slot.as_ref().filter(|c| c.ids == ids && c.a.dtype() == dt) {
            return Ok((c.a.clone(), c.b.clone()));
        }
        let (a, b) = make()?;
        *slot = Some(Cast {
            ids,
            a: a.clone(),
            b: b.clone(),
        });
        Ok((a, b))
    }
}

pub struct LoraLinear {
    /// Full module name, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    /// `[out, in]`, compute dtype (empty once `packed`).
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
    /// Position among the model's linear layers (`Llama::linears`): where an adapter's
    /// branches (`AdapterBranches`) keep this layer's.
    pub index: usize,
    /// The frozen weight in a lighter form for inference (`Llama::pack`).
    pub packed: Option<Packed>,
    /// `(out, in)`.
    dims: (usize, usize),
}

/// A frozen weight made lighter for inference: bf16 (read by the row kernel, widened to f32 as
/// it is read), candle's Q8_0 or Q5_0 (products with a Q8_0 input, `q8.rs`), Q4_K or Q6_K
/// (candle's `vec_dot`, `kquant.rs`) or another of candle's quantized types through its
/// `QMatMul`. Either way every output is a dot product of its own, whatever the other rows.
pub enum Packed {
    Bf16(Tensor),
    /// candle's Q8_0 or Q5_0 blocks in groups of eight rows, for the products of `q8.rs` (they
    /// read each weight once for all the rows of a product; `QMatMul` does not).
    Q8(super::q8::QRows),
    /// candle's Q4_K or Q6_K blocks, each output candle's `vec_dot` on the step's threads
    /// (`kquant.rs`).
    KQuant(super::kquant::KRows),
    Quantized(candle_core::quantized::QMatMul),
}

impl Packed {
    /// `x·Wᵀ` for `x: [rows, in]` in f32.
    pub fn product(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Packed::Bf16(w) => matmul::rows_matmul(x, w),
            Packed::Q8(w) => w.product(x),
            Packed::KQuant(w) => w.product(x),
            Packed::Quantized(q) => candle_core::Module::forward(q, &x.contiguous()?),
        }
    }

    /// Bytes the weight takes.
    pub fn bytes(&self) -> usize {
        match self {
            Packed::Bf16(w) => w.elem_count() * 2,
            Packed::Q8(w) => w.bytes(),
            Packed::KQuant(w) => w.bytes(),
            Packed::Quantized(candle_core::quantized::QMatMul::QTensor(q)) => {
                q.storage_size_in_bytes()
            }
            Packed::Quantized(
                candle_core::quantized::QMatMul::Tensor(w)
                | candle_core::quantized::QMatMul::TensorF16(w),
            ) => w.elem_count() * w.dtype().size_in_bytes(),
        }
    }
}

/// Each LoRA layer's branch of one adapter, by `LoraLinear::index` (`None`: the adapter leaves
/// that layer alone): what a batched step adds on the rows of the requests asking for it.
pub type AdapterBranches = Vec<Option<Lora>>;

fn branch_of(a: Option<&AdapterBranches>, index: usize) -> Option<&Lora> {
    a?.get(index)?.as_ref()
}

/// The rows of a batched step (`Llama::forward_step`): the decode rows (one token per
/// sequence) in runs of the same adapter, then each prefilling sequence's chunk. Every row
/// takes the row kernel (one dot product per output, in an order fixed by the length), so a
/// row's results do not depend on the other rows: not on its neighbours, nor on how its prompt
/// was cut into chunks.
pub(crate) struct StepRows<'a> {
    /// `(first row, rows, adapter)`: the runs of decode rows, then the prefill chunks.
    pub parts: Vec<(usize, usize, Option<&'a AdapterBranches>)>,
}

/// A layer's frozen products of a step's rows, computed ahead (`LoraLinear::prepare`).
pub(crate) struct Prepared(Option<Tensor>);

/// What the backward needs from the forward.
pub struct LinearSaved {
    x: Tensor,
    /// `dropout(x) A^T`, `[N, r]`.
    h: Option<Tensor>,
}

impl LoraLinear {
    pub fn load(
        vb: &candle_nn::VarBuilder,
        name: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let vb = vb.pp(name);
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self {
            name: vb.prefix(),
            weight,
            bias,
            lora: None,
            index: 0,
            packed: None,
            dims: (out_dim, in_dim),
        })
    }

    pub fn in_dim(&self) -> usize {
        self.dims.1
    }
    pub fn out_dim(&self) -> usize {
        self.dims.0
    }

    /// Replaces the dense weight by `p` (inference only from then on).
    pub fn pack(&mut self, p: Packed) -> Result<()> {
        self.packed = Some(p);
        self.weight = Tensor::zeros(0, self.weight.dtype(), self.weight.device())?;
        Ok(())
    }

    fn with_bias(&self, y: Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    fn base(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.packed {
            Some(p) => p.product(x)?,
            None => matmul::matmul(x, &self.weight.t()?)?,
        };
        self.with_bias(y)
    }

    /// The frozen products of a step's rows `x` computed ahead for the `layers` that read it
    /// (q, k and v; gate and up), in `layers`' order: when all are q8_0 or q5_0, the rows
    /// quantized once and every product in one parallel pass (`q8::products_of`); otherwise
    /// none (each layer's `forward_rows` computes its own).
    pub(crate) fn prepare<const N: usize>(
        layers: [&LoraLinear; N],
        x: &Tensor,
    ) -> Result<[Prepared; N]> {
        let q8: Option<Vec<&QRows>> = layers
            .iter()
            .map(|l| match &l.packed {
                Some(Packed::Q8(w)) => Some(w),
                _ => None,
            })
            .collect();
        let Some(ws) = q8 else {
            return Ok(std::array::from_fn(|_| Prepared(None)));
        };
        let q = Q8Input::of(&x.contiguous()?)?;
        let mut ys = products_of(&ws, &q, 0..x.dim(0)?, x.device())?.into_iter();
        Ok(std::array::from_fn(|_| Prepared(ys.next())))
    }

    /// The rows of a batched step (`StepRows`): the frozen product once over all of them
    /// (computed ahead in `prep`, the packed weight's own product, or the row kernel), and each
    /// adapter's LoRA term (its own scale) on its rows only, all runs in one call
    /// (`matmul::add_lora_rows`). Every row takes the same operations whatever the others.
    pub(crate) fn forward_rows(
        &self,
        x: &Tensor,
        rows: &StepRows,
        prep: &Prepared,
    ) -> Result<Tensor> {
        let y = match (&prep.0, &self.packed) {
            (Some(y), _) => y.clone(),
            (None, Some(p)) => p.product(x)?,
            (None, None) => matmul::rows_matmul(x, &self.weight)?,
        };
        let y = self.with_bias(y)?;
        let mut runs: Vec<matmul::LoraRun> = Vec::new();
        for &(start, n, a) in &rows.parts {
            if let Some(l) = branch_of(a, self.index) {
                let (la, lbt) = l.row_factors(x.dtype())?;
                runs.push((start, n, la, lbt, l.scale));
            }
        }
        if runs.is_empty() {
            return Ok(y);
        }
        matmul::add_lora_rows(y, x, &runs)
    }

    /// Inference forward for `x: [N, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_t(x, None)?.0)
    }

    /// Forward that keeps what backward needs. `ctx = None` means inference (no dropout).
    pub fn forward_t(&self, x: &Tensor, ctx: Option<&TrainCtx>) -> Result<(Tensor, LinearSaved)> {
        let y = self.base(x)?;
        let Some(l) = &self.lora else {
            return Ok((
                y,
                LinearSaved {
                    x: x.clone(),
                    h: None,
                },
            ));
        };
        let xd = match ctx {
            Some(c) if l.dropout > 0.0 => dropout(c, l, x)?,
            _ => x.clone(),
        };
        let (a, b) = l.factors(x.dtype())?;
        let h = matmul::matmul(&xd, &a.t()?)?;
        // y += scale · h Bᵀ, accumulated into y (the scale rides on the GEMM)
        let y = matmul::matmul_acc(y, &h, &b.t()?, l.scale)?;
        Ok((
            y,
            LinearSaved {
                x: x.clone(),
                h: Some(h),
            },
        ))
    }

    /// Backward: returns `dx` (added to `acc` when given: pass a fresh tensor this layer's
    /// input gradient is summed into, as for q/k/v sharing an input) and adds `dA`, `dB` into
    /// `grads`.
    pub fn backward(
        &self,
        saved: &LinearSaved,
        dy: &Tensor,
        ctx: &TrainCtx,
        grads: &mut Grads,
        acc: Option<Tensor>,
    ) -> Result<Tensor> {
        if self.packed.is_some() {
            candle_core::bail!(
                "{}: a packed (bf16 or quantized) weight is for inference only",
                self.name
            );
        }
        let dx = match acc {
            Some(acc) => matmul::matmul_acc(acc, dy, &self.weight, 1.0)?,
            None => matmul::matmul(dy, &self.weight)?,
        };
        let (Some(l), Some(h)) = (&self.lora, &saved.h) else {
            return Ok(dx);
        };
        let x = &saved.x;
        let dropped = l.dropout > 0.0;
        let xd = if dropped {
            dropout(ctx, l, x)?
        } else {
            x.clone()
        };
        let (a, b) = l.factors(dy.dtype())?;
        // the scale goes on the small results ([out, r] and [N, r]), not on dy
        let db = (matmul::matmul(&dy.t()?, h)? * l.scale)?; // [out, r]
        let dh = (matmul::matmul(dy, &b)? * l.scale)?; // [N, r]
        let da = matmul::matmul(&dh.t()?, &xd)?; // [r, in]
        grads.add(l.id, &da.to_dtype(l.a.dtype())?, &db.to_dtype(l.b.dtype())?)?;
        if dropped {
            // dx += dropout'(dh A): the same mask as the forward, regenerated
            add_dropped(ctx, l, dx, &matmul::matmul(&dh, &a)?)
        } else {
            matmul::matmul_acc(dx, &dh, &a, 1.0)
        }
    }
}

/// The module's dropout mask at this micro-step (`ops::DropoutMask`: regenerated, never stored).
fn mask(ctx: &TrainCtx, l: &Lora) -> ops::DropoutMask {
    ops::DropoutMask::new(ctx.seed, ctx.micro_step, l.id, l.dropout)
}

/// `dropout(x)` with the module's mask for this micro-step.
fn dropout(ctx: &TrainCtx, l: &Lora, x: &Tensor) -> Result<Tensor> {
    ops::dropout(x, mask(ctx, l))
}

/// `acc + dropout(t)` with the module's mask for this micro-step (in place where the kernel
/// runs, so `acc` must own its storage, as for `matmul::matmul_acc`).
fn add_dropped(ctx: &TrainCtx, l: &Lora, acc: Tensor, t: &Tensor) -> Result<Tensor> {
    ops::add_dropped(acc, t, mask(ctx, l))
}
