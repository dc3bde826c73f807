//! llama.cpp's GGUF files: importing one as a Hugging Face model directory (`import`), and
//! exporting a model directory, optionally with an adapter merged, as one (`export`). What both
//! directions share lives here: the tensor names and llama.cpp's Q/K row order.

mod export;
mod import;

pub use export::{export, weight_type, ExportOptions, ExportReport, ExportType};
pub use import::{import, ImportReport};

use anyhow::{bail, Result};
use candle_core::Tensor;

/// The Llama block tensors: (GGUF kind, HF module inside `model.layers.N`).
const BLOCK_TENSORS: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// The tensors outside the blocks: (GGUF name, HF name).
const GLOBAL_TENSORS: &[(&str, &str)] = &[
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// The HF name of a GGUF tensor.
fn hf_name(gguf: &str) -> Result<String> {
    if let Some((_, hf)) = GLOBAL_TENSORS.iter().find(|(g, _)| *g == gguf) {
        return Ok(hf.to_string());
    }
    let parts: Vec<&str> = gguf.split('.').collect();
    let [blk, i, kind, suffix] = parts.as_slice() else {
        bail!("unexpected GGUF tensor name '{gguf}'");
    };
    if *blk != "blk" || i.parse::<usize>().is_err() {
        bail!("unexpected GGUF tensor name '{gguf}'");
    }
    match BLOCK_TENSORS.iter().find(|(g, _)| g == kind) {
        Some((_, m)) => Ok(format!("model.layers.{i}.{m}.{suffix}")),
        None => bail!("unsupported GGUF tensor kind '{kind}' in '{gguf}'"),
    }
}

/// The GGUF name of an HF tensor.
fn gguf_name(hf: &str) -> Result<String> {
    if let Some((g, _)) = GLOBAL_TENSORS.iter().find(|(_, h)| *h == hf) {
        return Ok(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.").unwrap_or_default();
    let (i, module) = rest.split_once('.').unwrap_or_default();
    let (module, suffix) = module.rsplit_once('.').unwrap_or_default();
    match BLOCK_TENSORS.iter().find(|(_, m)| *m == module) {
        Some((g, _)) if i.parse::<usize>().is_ok() => Ok(format!("blk.{i}.{g}.{suffix}")),
        _ => bail!("tensor '{hf}' has no GGUF name (not a Llama-family weight)"),
    }
}

/// Inverse of llama.cpp's `permute` for q/k weights (HF rotate-half layout restored).
pub fn unpermute_qk(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    Ok(w.reshape((n_head, out / n_head / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

/// llama.cpp's `permute` of q/k weights: the rotate-half pairs of each head interleaved, the
/// layout its RoPE expects (the inverse of `unpermute_qk`).
pub fn permute_qk(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    Ok(w.reshape((n_head, 2, out / n_head / 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(n_head, 2, d0/n_head/2, in).swapaxes(1,2).reshape(d0, in)
        let (nh, d0, inp) = (2, 8, 3);
        let w = Tensor::arange(0f32, (d0 * inp) as f32, &Device::Cpu)
            .unwrap()
            .reshape((d0, inp))
            .unwrap();
        let permuted = w
            .reshape((nh, 2, d0 / nh / 2, inp))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((d0, inp))
            .unwrap();
        let back = unpermute_qk(&permuted, nh).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn names_map_to_hf() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight").unwrap(),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert!(hf_name("blk.3.weird.weight").is_err());
    }

    #[test]
    fn permute_and_unpermute_are_inverse_and_names_round_trip() {
        let w = Tensor::arange(0f32, 48., &Device::Cpu)
            .unwrap()
            .reshape((8, 6))
            .unwrap();
        let back = unpermute_qk(&permute_qk(&w, 2).unwrap(), 2).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        for g in [
            "token_embd.weight",
            "output.weight",
            "blk.12.attn_v.weight",
            "blk.0.ffn_down.weight",
            "blk.3.attn_q.bias",
        ] {
            assert_eq!(gguf_name(&hf_name(g).unwrap()).unwrap(), g);
        }
        assert!(gguf_name("model.layers.0.mlp.experts.weight").is_err());
    }
}
