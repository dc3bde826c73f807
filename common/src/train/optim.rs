//! AdamW (PyTorch semantics, decoupled weight decay) over the LoRA matrices, and global
//! gradient-norm clipping. State is plain tensors so checkpoints can hold it exactly.

use candle_core::{Result, Tensor};

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// First and second moments of one parameter.
#[derive(Clone)]
pub struct Moments {
    pub m: Tensor,
    pub v: Tensor,
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Number of updates applied so far.
    pub t: u64,
    pub state: Vec<Option<Moments>>,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, n_params: usize) -> Self {
        AdamW {
            cfg,
            t: 0,
            state: vec![None; n_params],
        }
    }

    /// Starts an update (advances the bias-correction step).
    pub fn begin_step(&mut self) {
        self.t += 1;
    }

    /// Updates parameter `i` in place-free style: returns the new value.
    pub fn update(&mut self, i: usize, p: &Tensor, g: &Tensor, lr: f64) -> Result<Tensor> {
        let c = self.cfg;
        let st = match self.state[i].take() {
            Some(s) => s,
            None => Moments {
                m: g.zeros_like()?,
                v: g.zeros_like()?,
            },
        };
        let m = ((&st.m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
        let v = ((&st.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        let p = if c.weight_decay != 0.0 {
            (p * (1.0 - lr * c.weight_decay))?
        } else {
            p.clone()
        };
        let denom = ((&v / bc2)?.sqrt()? + c.eps)?;
        let p = (p - ((&m / bc1)? / denom)?.affine(lr, 0.0)?)?;
        self.state[i] = Some(Moments { m, v });
        Ok(p)
    }
}

impl AdamW {
    /// One optimizer step over every LoRA matrix of `model`; `grads` in `Grads::into_flat`
    /// order (parameter `2*id` is A, `2*id + 1` is B).
    pub fn step_loras(
        &mut self,
        model: &mut crate::model::Llama,
        grads: &[Tensor],
        lr: f64,
    ) -> Result<()> {
        self.begin_step();
        for lo in model.loras_mut() {
            lo.a = self.update(2 * lo.id, &lo.a, &grads[2 * lo.id], lr)?;
            lo.b = self.update(2 * lo.id + 1, &lo.b, &grads[2 * lo.id + 1], lr)?;
        }
        Ok(())
    }
}

/// Scales gradients so their global norm is at most `max_norm` (PyTorch's clip_grad_norm_:
/// factor `max_norm / (norm + 1e-6)` when above). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [&mut Tensor], max_norm: f64) -> Result<f64> {
    // one reduction on the device, one transfer
    let sums = grads
        .iter()
        .map(|g| g.to_dtype(candle_core::DType::F64)?.sqr()?.sum_all())
        .collect::<Result<Vec<_>>>()?;
    let s = match sums.is_empty() {
        true => 0.0,
        false => Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f64>()?,
    };
    let norm = s.sqrt();
    if max_norm > 0.0 && norm.is_finite() && norm > max_norm {
        let f = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            **g = (&**g * f)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_matches_hand_computation() {
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut o = AdamW::new(cfg, 1);
        let p = Tensor::new(&[1.0f64, -2.0], &Device::Cpu).unwrap();
        let g = Tensor::new(&[0.5f64, 0.25], &Device::Cpu).unwrap();
        o.begin_step();
        let p1 = o.update(0, &p, &g, 0.01).unwrap().to_vec1::<f64>().unwrap();
        // step 1: mhat = g, vhat = g^2 -> update = lr * sign(g) (up to eps), after decay
        let want = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) - 0.01];
        for (a, b) in p1.iter().zip(want) {
            assert!((a - b).abs() < 1e-9, "{a} vs {b}");
        }
    }

    #[test]
    fn clipping() {
        let mut a = Tensor::new(&[3.0f32], &Device::Cpu).unwrap();
        let mut b = Tensor::new(&[4.0f32], &Device::Cpu).unwrap();
        let n = clip_grad_norm(&mut [&mut a, &mut b], 1.0).unwrap();
        assert_eq!(n, 5.0);
        let (x, y) = (
            a.to_vec1::<f32>().unwrap()[0],
            b.to_vec1::<f32>().unwrap()[0],
        );
        assert!(((x * x + y * y).sqrt() - 1.0).abs() < 1e-5);
        let mut c = Tensor::new(&[0.3f32], &Device::Cpu).unwrap();
        assert!((clip_grad_norm(&mut [&mut c], 1.0).unwrap() - 0.3).abs() < 1e-6);
        assert_eq!(
            c.to_vec1::<f32>().unwrap()[0],
            0.3,
            "below the limit: untouched"
        );
    }
}
