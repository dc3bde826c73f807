//! A frozen linear layer with an optional LoRA branch:
//! `y = x W^T (+ b) + scale * B(A(dropout(x)))`.
//!
//! Only the LoRA matrices get gradients; for the frozen weight the backward computes the input
//! gradient alone (`dx = dy W`), never `dW`.

use super::{matmul, ops, Grads, TrainCtx};
use candle_core::{Result, Tensor};
use rand::{Rng, SeedableRng};

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
}

pub struct LoraLinear {
    /// Full module name, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    /// `[out, in]`, compute dtype.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
}

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
        })
    }

    pub fn in_dim(&self) -> usize {
        self.weight.dims()[1]
    }
    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    fn base(&self, x: &Tensor) -> Result<Tensor> {
        let y = matmul::matmul(x, &self.weight.t()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
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
        let a = l.a.to_dtype(x.dtype())?;
        let b = l.b.to_dtype(x.dtype())?;
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
        let a = l.a.to_dtype(dy.dtype())?;
        let b = l.b.to_dtype(dy.dtype())?;
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

/// The dropout mask (values 0 or 1/(1-p)) of one LoRA module at one micro-step. It is a pure
/// function of (seed, micro-step, module id), so the backward and a resumed run regenerate
/// exactly the mask the forward used, and no mask needs to be stored. Elements come in
/// independently seeded chunks, generated in parallel.
struct Mask {
    stream: u64,
    /// drop when a 16-bit uniform is below this (drop probability resolution 1/65536)
    threshold: u32,
    keep: f32,
}

impl Mask {
    const CHUNK: usize = 1 << 16;

    fn new(ctx: &TrainCtx, l: &Lora) -> Self {
        Self {
            stream: ctx.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ ctx.micro_step.wrapping_mul(0xBF58_476D_1CE4_E5B9)
                ^ (l.id as u64).wrapping_mul(0x94D0_49BB_1331_11EB),
            threshold: (l.dropout * 65536.0).round() as u32,
            keep: (1.0 / (1.0 - l.dropout)) as f32,
        }
    }

    /// Calls `f(j, m)` with the mask value `m` of element `j` of chunk `c`, for `j < len`.
    fn chunk(&self, c: usize, len: usize, mut f: impl FnMut(usize, f32)) {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(
            self.stream ^ (c as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93),
        );
        // four 16-bit uniforms per 64-bit draw
        for q in (0..len).step_by(4) {
            let r: u64 = rng.random();
            for k in 0..4.min(len - q) {
                let u = ((r >> (16 * k)) & 0xFFFF) as u32;
                f(q + k, if u < self.threshold { 0.0 } else { self.keep });
            }
        }
    }

    /// `g(i, &mut out[i], mask[i])` for every element, in parallel chunks.
    fn apply(&self, out: &mut [f32], g: impl Fn(usize, &mut f32, f32) + Sync) {
        use rayon::prelude::*;
        out.par_chunks_mut(Self::CHUNK)
            .enumerate()
            .for_each(|(c, o)| {
                let base = c * Self::CHUNK;
                let len = o.len();
                self.chunk(c, len, |j, m| g(base + j, &mut o[j], m));
            });
    }

    fn tensor(&self, dims: &[usize], dev: &candle_core::Device) -> Result<Tensor> {
        let mut v = vec![0f32; dims.iter().product()];
        self.apply(&mut v, |_, o, m| *o = m);
        Tensor::from_vec(v, dims, dev)
    }
}

/// `dropout(x)` with the module's mask for this micro-step (one fused pass on the CPU in f32).
fn dropout(ctx: &TrainCtx, l: &Lora, x: &Tensor) -> Result<Tensor> {
    let mask = Mask::new(ctx, l);
    let fused = ops::with_cpu_f32(&[x], |s| {
        let xs = s[0];
        let mut out = vec![0f32; xs.len()];
        mask.apply(&mut out, |i, o, m| *o = xs[i] * m);
        out
    });
    match fused {
        Some(v) => Tensor::from_vec(v, x.dims(), x.device()),
        None => x * mask.tensor(x.dims(), x.device())?.to_dtype(x.dtype())?,
    }
}

/// `acc + dropout(t)` with the module's mask for this micro-step (in place on the CPU in f32, so
/// `acc` must own its storage, as for `matmul::matmul_acc`).
fn add_dropped(ctx: &TrainCtx, l: &Lora, acc: Tensor, t: &Tensor) -> Result<Tensor> {
    let mask = Mask::new(ctx, l);
    if ops::is_cpu_f32(&acc) && acc.is_contiguous() {
        acc.inplace_op2(&t.contiguous()?, &AddDropped(mask))?;
        return Ok(acc);
    }
    acc + (t * mask.tensor(t.dims(), t.device())?.to_dtype(t.dtype())?)?
}

struct AddDropped(Mask);

impl candle_core::InplaceOp2 for AddDropped {
    fn name(&self) -> &'static str {
        "dialora-add-dropped"
    }
    fn cpu_fwd(
        &self,
        dst: &mut candle_core::CpuStorage,
        dl: &candle_core::Layout,
        src: &candle_core::CpuStorage,
        sl: &candle_core::Layout,
    ) -> Result<()> {
        let (d, s) = (ops::f32_mut(dst, dl)?, ops::f32_slice(src, sl)?);
        if d.len() != s.len() {
            candle_core::bail!("add_dropped: {} vs {} elements", d.len(), s.len());
        }
        self.0.apply(d, |i, o, m| *o += s[i] * m);
        Ok(())
    }
}
