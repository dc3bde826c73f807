//! The feed-forward part of a Llama block, SwiGLU: `y = (silu(x Wgᵀ) ⊙ x Wuᵀ) Wdᵀ`, with its
//! backward:
//!
//! ```text
//! dA = dy Wd                     A = silu(G) ⊙ U,  G = x Wgᵀ,  U = x Wuᵀ
//! dU = dA ⊙ silu(G)
//! dG = dA ⊙ U ⊙ σ(G) (1 + G (1 − σ(G)))
//! dx = dG Wg + dU Wu
//! ```

use super::linear::{LinearSaved, LoraLinear, StepRows};
use super::{ops, Grads, TrainCtx};
use crate::config::ModelConfig;
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

pub(crate) struct Mlp {
    pub(crate) gate: LoraLinear,
    pub(crate) up: LoraLinear,
    pub(crate) down: LoraLinear,
}

/// What the backward needs from the forward.
pub(crate) struct MlpSaved {
    lg: LinearSaved,
    lu: LinearSaved,
    ld: LinearSaved,
    g: Tensor,
    u: Tensor,
}

impl Mlp {
    pub(crate) fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate: LoraLinear::load(&vb, "gate_proj", d, f, false)?,
            up: LoraLinear::load(&vb, "up_proj", d, f, false)?,
            down: LoraLinear::load(&vb, "down_proj", f, d, false)?,
        })
    }

    /// `x: [B, T, D]`; with `ctx` (training) the activations the backward needs are returned.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        ctx: Option<&TrainCtx>,
    ) -> Result<(Tensor, Option<MlpSaved>)> {
        let (b, t, d) = x.dims3()?;
        let x2 = x.reshape((b * t, d))?;
        let (g, lg) = self.gate.forward_t(&x2, ctx)?;
        let (u, lu) = self.up.forward_t(&x2, ctx)?;
        let a = ops::swiglu(&g, &u)?;
        let (y, ld) = self.down.forward_t(&a, ctx)?;
        Ok((
            y.reshape((b, t, d))?,
            ctx.map(|_| MlpSaved { lg, lu, ld, g, u }),
        ))
    }

    /// The rows of a batched step, `x: [rows, D]` (`LoraLinear::forward_rows`).
    pub(crate) fn forward_rows(&self, x: &Tensor, rows: &StepRows) -> Result<Tensor> {
        // gate and up read one input: their frozen products in one pass
        let [pg, pu] = LoraLinear::prepare([&self.gate, &self.up], x)?;
        let g = self.gate.forward_rows(x, rows, &pg)?;
        let u = self.up.forward_rows(x, rows, &pu)?;
        let a = ops::swiglu(&g, &u)?;
        let [pd] = LoraLinear::prepare([&self.down], &a)?;
        self.down.forward_rows(&a, rows, &pd)
    }

    /// Input gradient from the output gradient `dy: [B, T, D]`; LoRA gradients go into `grads`.
    pub(crate) fn backward(
        &self,
        s: &MlpSaved,
        dy: &Tensor,
        ctx: &TrainCtx,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let (b, t, d) = dy.dims3()?;
        let da = self
            .down
            .backward(&s.ld, &dy.reshape((b * t, d))?, ctx, grads, None)?;
        let (dg, du) = ops::swiglu_backward(&s.g, &s.u, &da)?;
        let dx = self.gate.backward(&s.lg, &dg, ctx, grads, None)?;
        let dx = self.up.backward(&s.lu, &du, ctx, grads, Some(dx))?;
        dx.reshape((b, t, d))
    }
}
