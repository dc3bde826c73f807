//! A frozen linear layer with an optional LoRA branch:
//! `y = x W^T (+ b) + scale * B(A(dropout(x)))`.
//!
//! Only the LoRA matrices get gradients; for the frozen weight the backward computes the input
//! gradient alone (`dx = dy W`), never `dW`.

use super::{Grads, TrainCtx};
use candle_core::{DType, Result, Tensor};
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
        let y = x.matmul(&self.weight.t()?)?;
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
            Some(c) if l.dropout > 0.0 => {
                (x * dropout_mask(c, l, x.dims(), x.dtype(), x.device())?)?
            }
            _ => x.clone(),
        };
        let a = l.a.to_dtype(x.dtype())?;
        let b = l.b.to_dtype(x.dtype())?;
        let h = xd.matmul(&a.t()?)?;
        // scale the small [N, r] factor, not the [N, out] product
        let y = (y + (&h * l.scale)?.matmul(&b.t()?)?)?;
        Ok((
            y,
            LinearSaved {
                x: x.clone(),
                h: Some(h),
            },
        ))
    }

    /// Backward: returns `dx` and adds `dA`, `dB` into `grads`.
    pub fn backward(
        &self,
        saved: &LinearSaved,
        dy: &Tensor,
        ctx: &TrainCtx,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let dx = dy.matmul(&self.weight)?;
        let (Some(l), Some(h)) = (&self.lora, &saved.h) else {
            return Ok(dx);
        };
        let x = &saved.x;
        let mask = if l.dropout > 0.0 {
            Some(dropout_mask(ctx, l, x.dims(), x.dtype(), x.device())?)
        } else {
            None
        };
        let xd = match &mask {
            Some(m) => (x * m)?,
            None => x.clone(),
        };
        let a = l.a.to_dtype(dy.dtype())?;
        let b = l.b.to_dtype(dy.dtype())?;
        // the scale goes on the small results ([out, r] and [N, r]), not on dy
        let db = (dy.t()?.matmul(h)? * l.scale)?; // [out, r]
        let dh = (dy.matmul(&b)? * l.scale)?; // [N, r]
        let da = dh.t()?.matmul(&xd)?; // [r, in]
        let mut dxl = dh.matmul(&a)?; // [N, in]
        if let Some(m) = &mask {
            dxl = (dxl * m)?;
        }
        grads.add(l.id, &da.to_dtype(l.a.dtype())?, &db.to_dtype(l.b.dtype())?)?;
        dx + dxl
    }
}

/// Dropout mask (values 0 or 1/(1-p)) for one LoRA module at one micro-step. It is a pure
/// function of (seed, micro-step, module id), so the backward and a resumed run regenerate
/// exactly the mask the forward used, and no mask needs to be stored.
fn dropout_mask(
    ctx: &TrainCtx,
    l: &Lora,
    dims: &[usize],
    dtype: DType,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let stream = ctx.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ ctx.micro_step.wrapping_mul(0xBF58_476D_1CE4_E5B9)
        ^ (l.id as u64).wrapping_mul(0x94D0_49BB_1331_11EB);
    let keep = (1.0 / (1.0 - l.dropout)) as f32;
    // four 16-bit uniforms per 64-bit draw (drop probability resolution 1/65536), in
    // independently seeded chunks generated in parallel
    let threshold = (l.dropout * 65536.0).round() as u32;
    const CHUNK: usize = 1 << 16;
    let mut v = vec![0f32; n];
    use rayon::prelude::*;
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(
            stream ^ (c as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93),
        );
        for quad in out.chunks_mut(4) {
            let r: u64 = rng.random();
            for (k, o) in quad.iter_mut().enumerate() {
                let u = ((r >> (16 * k)) & 0xFFFF) as u32;
                *o = if u < threshold { 0.0 } else { keep };
            }
        }
    });
    Tensor::from_vec(v, dims, dev)?.to_dtype(dtype)
}
