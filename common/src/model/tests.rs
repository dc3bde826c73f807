use super::*;
use crate::config::ModelConfig;
use crate::lora::LoraConfig;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

pub(crate) fn tiny_config(tied: bool) -> ModelConfig {
    serde_json::from_value(serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 40, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 64, "tie_word_embeddings": tied
    }))
    .unwrap()
}

use crate::model::init::random_weights;
use crate::testing::max_abs_diff;

pub(crate) fn tiny_model(cfg: &ModelConfig, dtype: DType) -> Llama {
    let vb =
        candle_nn::VarBuilder::from_tensors(random_weights(cfg, 7, dtype), dtype, &Device::Cpu);
    Llama::load(vb, cfg).unwrap()
}

fn random_lora(model: &mut Llama, targets: &[&str], dropout: f64, b_zero: bool, dtype: DType) {
    let lc = LoraConfig::new(
        3,
        6.0,
        dropout,
        targets.iter().map(|s| s.to_string()).collect(),
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    model
        .attach_lora(&lc, |_, r, i, o| {
            let mut mk = |rows: usize, cols: usize, zero: bool| {
                let v: Vec<f64> = (0..rows * cols)
                    .map(|_| {
                        if zero {
                            0.0
                        } else {
                            rng.random::<f64>() * 0.6 - 0.3
                        }
                    })
                    .collect();
                Tensor::from_vec(v, (rows, cols), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            Ok((mk(r, i, false), mk(o, r, b_zero)))
        })
        .unwrap();
}

fn batch(b: usize, t: usize, vocab: u32, seed: u64) -> Batch {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let ids: Vec<u32> = (0..b * t).map(|_| rng.random_range(0..vocab)).collect();
    // mask roughly a third of the labels, like prompt tokens
    let labels: Vec<i64> = ids
        .iter()
        .map(|&i| {
            if rng.random::<f64>() < 0.33 {
                -100
            } else {
                i as i64
            }
        })
        .collect();
    Batch {
        input_ids: Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap(),
        labels,
    }
}

fn loss_of(model: &Llama, bt: &Batch, ctx: &TrainCtx) -> f64 {
    let mut g = Grads::new(model.num_loras());
    model
        .forward_backward(bt, ctx, 1.0, &mut g)
        .unwrap()
        .loss_sum
}

fn set_lora_entry(model: &mut Llama, id: usize, which: char, idx: usize, delta: f64) {
    for l in model.linears_mut() {
        if let Some(lo) = l.lora.as_mut() {
            if lo.id == id {
                let t = if which == 'A' { &mut lo.a } else { &mut lo.b };
                let mut v = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                v[idx] += delta;
                *t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
            }
        }
    }
}

#[test]
fn lora_gradients_match_finite_differences() {
    for tied in [true, false] {
        let cfg = tiny_config(tied);
        let mut model = tiny_model(&cfg, DType::F64);
        random_lora(&mut model, crate::lora::TARGETABLE, 0.1, false, DType::F64);
        let bt = batch(2, 7, cfg.vocab_size as u32, 3);
        let ctx = TrainCtx {
            seed: 5,
            micro_step: 9,
            gradient_checkpointing: false,
            neftune_noise_alpha: None,
        };
        let mut grads = Grads::new(model.num_loras());
        model.forward_backward(&bt, &ctx, 1.0, &mut grads).unwrap();
        let names: Vec<(String, usize, usize, usize)> = model
            .loras()
            .iter()
            .map(|(n, l)| (n.to_string(), l.id, l.a.elem_count(), l.b.elem_count()))
            .collect();
        assert_eq!(names.len(), 14, "7 module kinds x 2 layers");
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let eps = 1e-5;
        let mut worst = 0f64;
        for (name, id, na, nb) in &names {
            for (which, n) in [('A', *na), ('B', *nb)] {
                let g = if which == 'A' {
                    &grads.a[*id]
                } else {
                    &grads.b[*id]
                };
                let g = g
                    .as_ref()
                    .unwrap_or_else(|| panic!("no gradient for {name} {which}"));
                let gv = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                assert!(
                    gv.iter().any(|x| x.abs() > 1e-8),
                    "{name} {which}: gradient is zero"
                );
                for _ in 0..3 {
                    let idx = rng.random_range(0..n);
                    set_lora_entry(&mut model, *id, which, idx, eps);
                    let lp = loss_of(&model, &bt, &ctx);
                    set_lora_entry(&mut model, *id, which, idx, -2.0 * eps);
                    let lm = loss_of(&model, &bt, &ctx);
                    set_lora_entry(&mut model, *id, which, idx, eps);
                    let fd = (lp - lm) / (2.0 * eps);
                    let err = (fd - gv[idx]).abs() / (fd.abs().max(gv[idx].abs()).max(1e-3));
                    worst = worst.max(err);
                    assert!(
                        err < 1e-5,
                        "{name} lora_{which}[{idx}]: analytic {} vs finite-difference {fd}",
                        gv[idx]
                    );
                }
            }
        }
        // layer 0 receives gradient through every op of layer 1 and of itself
        assert!(names[0].0.starts_with("model.layers.0."));
        eprintln!("tied={tied}: worst relative FD error {worst:.2e}");
    }
}

#[test]
fn zero_b_gives_base_logits_exactly() {
    let cfg = tiny_config(true);
    let base = tiny_model(&cfg, DType::F32);
    let mut lora = tiny_model(&cfg, DType::F32);
    random_lora(&mut lora, crate::lora::TARGETABLE, 0.0, true, DType::F32);
    let bt = batch(1, 9, cfg.vocab_size as u32, 4);
    let a = base
        .forward(&bt.input_ids, None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = lora
        .forward(&bt.input_ids, None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(a, b);
    // and a non-zero B does change them (the test can fail)
    let mut lora2 = tiny_model(&cfg, DType::F32);
    random_lora(&mut lora2, &["q_proj"], 0.0, false, DType::F32);
    let c = lora2
        .forward(&bt.input_ids, None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_ne!(a, c);
}

#[test]
fn kv_cache_matches_full_forward() {
    let cfg = tiny_config(false);
    let mut model = tiny_model(&cfg, DType::F32);
    random_lora(
        &mut model,
        &["q_proj", "v_proj", "down_proj"],
        0.0,
        false,
        DType::F32,
    );
    let bt = batch(1, 10, cfg.vocab_size as u32, 8);
    let full = model.forward(&bt.input_ids, None).unwrap();
    let mut cache = model.new_cache();
    let first = model
        .forward(&bt.input_ids.narrow(1, 0, 6).unwrap(), Some(&mut cache))
        .unwrap();
    let mut parts = vec![first];
    for i in 6..10 {
        parts.push(
            model
                .forward(&bt.input_ids.narrow(1, i, 1).unwrap(), Some(&mut cache))
                .unwrap(),
        );
    }
    assert_eq!(cache.len(), 10);
    let inc = Tensor::cat(&parts, 1).unwrap();
    let diff = max_abs_diff(&full, &inc) as f32;
    assert!(diff < 1e-5, "cache vs full max diff {diff}");
}

#[test]
fn checkpointing_gives_identical_gradients_and_eval_matches_train_loss() {
    let cfg = tiny_config(true);
    let mut model = tiny_model(&cfg, DType::F32);
    random_lora(&mut model, crate::lora::TARGETABLE, 0.2, false, DType::F32);
    let bt = batch(2, 6, cfg.vocab_size as u32, 2);
    let mut g1 = Grads::new(model.num_loras());
    let mut g2 = Grads::new(model.num_loras());
    let c1 = TrainCtx {
        seed: 1,
        micro_step: 0,
        gradient_checkpointing: false,
        neftune_noise_alpha: None,
    };
    let c2 = TrainCtx {
        gradient_checkpointing: true,
        neftune_noise_alpha: None,
        ..c1
    };
    let s1 = model.forward_backward(&bt, &c1, 0.5, &mut g1).unwrap();
    let s2 = model.forward_backward(&bt, &c2, 0.5, &mut g2).unwrap();
    assert_eq!(s1.loss_sum, s2.loss_sum);
    for (a, b) in
        g1.a.iter()
            .chain(g1.b.iter())
            .zip(g2.a.iter().chain(g2.b.iter()))
    {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
    // without dropout the training loss equals the evaluation loss
    let mut m0 = tiny_model(&cfg, DType::F32);
    random_lora(&mut m0, crate::lora::TARGETABLE, 0.0, false, DType::F32);
    let mut g = Grads::new(m0.num_loras());
    let tr = m0.forward_backward(&bt, &c1, 1.0, &mut g).unwrap();
    let ev = m0.eval_loss(&bt).unwrap();
    assert_eq!(tr.tokens, ev.tokens);
    assert!(
        (tr.loss_sum - ev.loss_sum).abs() < 1e-4 * ev.loss_sum.abs(),
        "{} vs {}",
        tr.loss_sum,
        ev.loss_sum
    );
}

#[test]
fn adapter_for_another_base_is_refused() {
    let cfg = tiny_config(true);
    let mut model = tiny_model(&cfg, DType::F32);
    let mut w = std::collections::BTreeMap::new();
    w.insert(
        "model.layers.5.self_attn.q_proj".to_string(),
        (
            Tensor::zeros((2, 16), DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros((16, 2), DType::F32, &Device::Cpu).unwrap(),
        ),
    );
    let ad = crate::lora::Adapter {
        dir: "ad".into(),
        config: LoraConfig::new(2, 4.0, 0.0, vec!["q_proj".into()]),
        weights: w,
    };
    let e = model
        .attach_adapter(&ad, std::path::Path::new("base"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.layers.5.self_attn.q_proj")
            && e.contains("has 2 layers")
            && e.contains("different base"),
        "{e}"
    );
    let mut w = std::collections::BTreeMap::new();
    w.insert(
        "model.layers.0.self_attn.q_proj".to_string(),
        (
            Tensor::zeros((2, 17), DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros((16, 2), DType::F32, &Device::Cpu).unwrap(),
        ),
    );
    let ad = crate::lora::Adapter {
        dir: "ad".into(),
        config: LoraConfig::new(2, 4.0, 0.0, vec!["q_proj".into()]),
        weights: w,
    };
    let e = model
        .attach_adapter(&ad, std::path::Path::new("base"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("do not fit") && e.contains("[16, 16]"), "{e}");
}

#[test]
fn fused_cpu_cross_entropy_matches_reference() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let (c, v) = (7usize, 301usize);
    let x: Vec<f32> = (0..c * v)
        .map(|_| rng.random::<f32>() * 20.0 - 10.0)
        .collect();
    let t: Vec<u32> = (0..c).map(|_| rng.random_range(0..v as u32)).collect();
    let logits = Tensor::from_vec(x.clone(), (c, v), &Device::Cpu).unwrap();
    let tt = Tensor::from_slice(&t, c, &Device::Cpu).unwrap();
    let (losses, grad) = ops::cross_entropy(logits.copy().unwrap(), &tt, Some(0.25)).unwrap();
    let losses: Vec<f32> = losses.to_vec1().unwrap();
    let g: Vec<f32> = grad.unwrap().flatten_all().unwrap().to_vec1().unwrap();
    for i in 0..c {
        let row: Vec<f64> = x[i * v..(i + 1) * v].iter().map(|&a| a as f64).collect();
        let m = row.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = row.iter().map(|a| (a - m).exp()).sum();
        let want = m + z.ln() - row[t[i] as usize];
        assert!(
            (losses[i] as f64 - want).abs() < 1e-4,
            "row {i}: {} vs {want}",
            losses[i]
        );
        for j in 0..v {
            let p = (row[j] - m).exp() / z;
            let wg = 0.25 * (p - if j == t[i] as usize { 1.0 } else { 0.0 });
            assert!((g[i * v + j] as f64 - wg).abs() < 1e-6, "grad [{i},{j}]");
        }
    }
    let (l2, none) = ops::cross_entropy(logits, &tt, None).unwrap();
    assert!(none.is_none());
    for (a, b) in l2.to_vec1::<f32>().unwrap().iter().zip(&losses) {
        assert_eq!(a, b);
    }
}

#[test]
fn fused_cpu_kernels_match_generic_ops() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut t = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        Tensor::from_vec(
            (0..n)
                .map(|_| rng.random::<f32>() * 4.0 - 2.0)
                .collect::<Vec<f32>>(),
            shape,
            &Device::Cpu,
        )
        .unwrap()
    };
    let close = |a: &Tensor, b: &Tensor, what: &str| {
        let d = max_abs_diff(a, b) as f32;
        assert!(d < 1e-5, "{what}: fused vs generic differ by {d}");
    };
    let (x, w, dy) = (t(&[37, 48]), t(&[48]), t(&[37, 48]));
    close(
        &ops::rms_norm_backward(&x, &w, 1e-5, &dy).unwrap(),
        &ops::rms_norm_backward_generic(&x, &w, 1e-5, &dy).unwrap(),
        "rmsnorm",
    );
    let p = candle_nn::ops::softmax_last_dim(&t(&[2, 3, 19, 19])).unwrap();
    let dp = t(&[2, 3, 19, 19]);
    close(
        &ops::softmax_backward(&p, dp.copy().unwrap(), 0.125).unwrap(),
        &(ops::softmax_backward_generic(&p, &dp).unwrap() * 0.125).unwrap(),
        "softmax backward",
    );
    // causal softmax: 2 grouped heads folded into the rows, 5 new positions after 3 cached
    let s = t(&[2, 3, 2 * 5, 8]);
    let mask = ops::causal_mask(5, 3, 2, DType::F32, &Device::Cpu).unwrap();
    let want = candle_nn::ops::softmax_last_dim(&(&s * 0.3).unwrap().broadcast_add(&mask).unwrap())
        .unwrap();
    let got = ops::causal_softmax(s.copy().unwrap(), 0.3, 5, 3).unwrap();
    close(&got, &want, "causal softmax");
    let row: Vec<f32> = got
        .get(0)
        .unwrap()
        .get(0)
        .unwrap()
        .get(6)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(
        &row[5..],
        &[0.0, 0.0, 0.0],
        "row 6 = position 3+1 sees keys 0..=4 only"
    );
    let (g, u, da) = (
        t(&[33, 70000 / 33]),
        t(&[33, 70000 / 33]),
        t(&[33, 70000 / 33]),
    );
    close(
        &ops::swiglu(&g, &u).unwrap(),
        &(g.silu().unwrap() * &u).unwrap(),
        "swiglu",
    );
    let (a1, b1) = ops::swiglu_backward(&g, &u, &da).unwrap();
    let (a2, b2) = ops::swiglu_backward_generic(&g, &u, &da).unwrap();
    close(&a1, &a2, "swiglu dg");
    close(&b1, &b2, "swiglu du");
}

/// Loss and LoRA gradients (`[dA...]`, `[dB...]`, as f64) of one training micro-step of the
/// tiny model with LoRA (dropout 0.2) on every module, computed in `dtype` (LoRA factors f32,
/// or f64 for the f64 model), with the plain-candle kernels when `generic`.
fn step_in(dtype: DType, generic: bool) -> (f64, Vec<f64>, Vec<f64>) {
    let cfg = tiny_config(true);
    let ctx = TrainCtx {
        seed: 5,
        micro_step: 3,
        gradient_checkpointing: false,
        neftune_noise_alpha: None,
    };
    let bt = batch(2, 9, cfg.vocab_size as u32, 4);
    let master = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let mut model = tiny_model(&cfg, dtype);
    random_lora(&mut model, crate::lora::TARGETABLE, 0.2, false, master);
    let mut g = Grads::new(model.num_loras());
    ops::force_generic(generic);
    let loss = model.forward_backward(&bt, &ctx, 0.1, &mut g);
    ops::force_generic(false);
    let loss = loss.unwrap().loss_sum;
    let flat = |v: &Vec<Option<Tensor>>| -> Vec<f64> {
        v.iter()
            .flat_map(|t| {
                t.as_ref()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            })
            .collect()
    };
    (loss, flat(&g.a), flat(&g.b))
}

/// Asserts that a step's loss and gradients match the f64 reference's within `tol` (relative
/// to the loss, and to the largest gradient entry).
fn assert_step_close(
    what: &str,
    got: (f64, Vec<f64>, Vec<f64>),
    want: &(f64, Vec<f64>, Vec<f64>),
    tol: f64,
) {
    assert!(
        (got.0 - want.0).abs() < tol * want.0.abs(),
        "{what}: loss {} vs {}",
        got.0,
        want.0
    );
    for (m, x, y) in [("A", &got.1, &want.1), ("B", &got.2, &want.2)] {
        let scale = y.iter().fold(0f64, |m, v| m.max(v.abs()));
        let worst = x.iter().zip(y).fold(0f64, |m, (p, q)| m.max((p - q).abs()));
        assert!(
            scale > 0.0 && worst < tol * scale,
            "{what}: grad {m}: off by {worst} (max {scale})"
        );
    }
}

/// The CPU f32 path (in-place GEMM accumulation, the custom ops' CPU bodies) against the
/// plain-candle f64 path, which the finite-difference test checks: same loss and LoRA
/// gradients up to f32 rounding.
#[test]
fn fast_f32_path_matches_generic_f64_path() {
    let want = step_in(DType::F64, true);
    assert_step_close("custom ops, f32", step_in(DType::F32, false), &want, 1e-4);
}

/// The device-generic path (the plain-candle references a device without a kernel runs, and
/// the formulas the CUDA kernels follow), forced on the CPU, in f32 and bf16 against f64. The
/// bf16 model computes in bf16 with f32 softmax, norm and loss accumulation: its error is
/// bf16's (3 significant digits), not a wrong formula.
#[test]
fn generic_path_in_f32_and_bf16_matches_f64() {
    let want = step_in(DType::F64, true);
    assert_step_close("generic, f32", step_in(DType::F32, true), &want, 1e-4);
    assert_step_close("generic, bf16", step_in(DType::BF16, true), &want, 0.05);
    // and the custom-op dispatch with bf16 tensors on the CPU (no CPU body: the references)
    assert_step_close("custom ops, bf16", step_in(DType::BF16, false), &want, 0.05);
}

/// The dropout mask is a pure function of (seed, micro-step, module, element index): the
/// kernels' parallel chunks give what `DropoutMask::value` gives element by element (which is
/// what the CUDA kernel computes), it drops about p of the elements, and another micro-step or
/// module gets another mask.
#[test]
fn dropout_mask_is_counter_based() {
    let n = 100_003;
    let m = ops::DropoutMask::new(42, 7, 3, 0.25);
    let t: Vec<f32> = m
        .tensor(&[n], DType::F32, &Device::Cpu)
        .unwrap()
        .to_vec1()
        .unwrap();
    for (i, &v) in t.iter().enumerate() {
        assert_eq!(v, m.value(i), "element {i}");
    }
    let dropped = t.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
    assert!((dropped - 0.25).abs() < 0.01, "dropped {dropped}");
    assert!(t.iter().all(|&v| v == 0.0 || v == (1.0f32 / 0.75)));
    for other in [
        ops::DropoutMask::new(42, 8, 3, 0.25),
        ops::DropoutMask::new(42, 7, 4, 0.25),
        ops::DropoutMask::new(43, 7, 3, 0.25),
    ] {
        let same = (0..n).filter(|&i| other.value(i) == t[i]).count() as f64 / n as f64;
        assert!(same < 0.7, "masks agree on {same} of the elements");
    }
    // the custom op (CPU body) and the reference give the same values
    let x = Tensor::from_vec(
        (0..n).map(|i| (i % 97) as f32 - 48.0).collect::<Vec<f32>>(),
        n,
        &Device::Cpu,
    )
    .unwrap();
    let fused = ops::dropout(&x, m).unwrap();
    ops::force_generic(true);
    let generic = ops::dropout(&x, m).unwrap();
    let generic_add = ops::add_dropped(x.copy().unwrap(), &x, m).unwrap();
    ops::force_generic(false);
    assert_eq!(max_abs_diff(&fused, &generic), 0.0);
    let fused_add = ops::add_dropped(x.copy().unwrap(), &x, m).unwrap();
    assert_eq!(max_abs_diff(&fused_add, &generic_add), 0.0);
    assert_eq!(max_abs_diff(&fused_add, &(&x + &fused).unwrap()), 0.0);
}

/// A batched step (`forward_step`): sequences of the base model and of two adapters, some
/// prefilling (in chunks), some decoding, each get the logits the plain forward gives them
/// alone with their adapter attached.
#[test]
fn a_batched_step_gives_each_sequence_its_own_logits() {
    let cfg = tiny_config(true);
    let mut model = tiny_model(&cfg, DType::F32);
    random_lora(&mut model, crate::lora::TARGETABLE, 0.0, false, DType::F32);
    let a1 = model.take_loras();
    random_lora(&mut model, &["q_proj", "v_proj"], 0.0, false, DType::F32);
    let a2: Vec<Option<Lora>> = model
        .take_loras()
        .into_iter()
        .map(|l| {
            l.map(|mut l| {
                l.scale *= 3.0;
                l
            })
        })
        .collect();
    let adapters = [None, Some(&a1), Some(&a2), Some(&a1)];
    let prompts: [Vec<u32>; 4] = [
        vec![1, 5, 9, 2, 7, 3, 3, 8],
        vec![4, 4, 11],
        vec![30, 2, 6, 7, 1],
        vec![9, 8, 7, 6, 5, 4, 3],
    ];
    let mut caches: Vec<KvCache> = (0..4).map(|_| model.new_cache()).collect();
    let mut seqs: Vec<Vec<u32>> = vec![Vec::new(); 4];
    let mut fed = [0usize; 4];
    // steps: prompts read 3 tokens at a time, then decoding with made-up next tokens
    for step in 0..7 {
        let mut inputs = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            if fed[i] < p.len() {
                let end = (fed[i] + 3).min(p.len());
                inputs.push((p[fed[i]..end].to_vec(), false, end == p.len()));
            } else {
                inputs.push((vec![((step * 7 + i * 3) % 40) as u32], true, true));
            }
        }
        let mut steps: Vec<StepSeq> = caches
            .iter_mut()
            .zip(&inputs)
            .zip(adapters)
            .map(|((c, (t, decode, logits)), a)| StepSeq {
                tokens: t,
                cache: c,
                adapter: a,
                decode: *decode,
                logits: *logits,
            })
            .collect();
        let out = model.forward_step(&mut steps).unwrap();
        for (i, (t, _, logits)) in inputs.iter().enumerate() {
            seqs[i].extend(t);
            fed[i] += t.len();
            assert_eq!(out[i].is_some(), *logits);
            let Some(got) = &out[i] else { continue };
            if let Some(a) = adapters[i] {
                model.put_loras(a.clone());
            }
            let ids = Tensor::new(seqs[i].as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let want = model.forward_last(&ids, None).unwrap().squeeze(0).unwrap();
            model.take_loras();
            let d = max_abs_diff(got, &want);
            assert!(d < 1e-4, "step {step}, sequence {i}: {d}");
        }
    }
}

/// Packed weights (bf16 here) give the f32 logits to bf16's rounding, through the packed head
/// for an untied model too, and are counted at their size.
#[test]
fn packed_weights_keep_the_logits_tied_or_not() {
    for tied in [true, false] {
        let cfg = tiny_config(tied);
        let dense = tiny_model(&cfg, DType::F32);
        let mut light = tiny_model(&cfg, DType::F32);
        light.pack(WeightFormat::Bf16).unwrap();
        let ids = Tensor::new(&[[3u32, 7, 1, 30, 12]], &Device::Cpu).unwrap();
        let want = dense.forward(&ids, None).unwrap();
        let got = light.forward(&ids, None).unwrap();
        let d = max_abs_diff(&got, &want);
        assert!(d < 0.05, "tied {tied}: {d}");
        let ratio = light.weight_bytes() as f64 / dense.weight_bytes() as f64;
        assert!((ratio - 0.5).abs() < 0.02, "tied {tied}: {ratio}");
    }
}

/// Feeds `prompt` through `forward_step` in pieces of `plan` (a piece of 1 after the first is
/// fed as a decode row), with a neighbour sequence (its own prompt and adapter) sharing every
/// step when `neighbour`, and returns the last position's logits.
fn logits_fed(
    model: &Llama,
    adapter: Option<&AdapterBranches>,
    other: Option<&AdapterBranches>,
    prompt: &[u32],
    plan: &[usize],
    neighbour: bool,
) -> Tensor {
    assert_eq!(plan.iter().sum::<usize>(), prompt.len());
    let mut cache = model.new_cache();
    let mut theirs = model.new_cache();
    let mut at = 0;
    let mut last = None;
    for (i, &n) in plan.iter().enumerate() {
        let other_tokens = [(i * 5 % 37) as u32 + 1, 2, 3][..if i == 0 { 3 } else { 1 }].to_vec();
        let mut steps = vec![StepSeq {
            tokens: &prompt[at..at + n],
            cache: &mut cache,
            adapter,
            decode: i > 0 && n == 1,
            logits: at + n == prompt.len(),
        }];
        if neighbour {
            steps.insert(
                i % 2,
                StepSeq {
                    tokens: &other_tokens,
                    cache: &mut theirs,
                    adapter: other,
                    decode: i > 0,
                    logits: true,
                },
            );
        }
        let mut out = model.forward_step(&mut steps).unwrap();
        let mine = out.remove(if neighbour { 1 - i % 2 } else { 0 });
        last = mine.or(last);
        at += n;
    }
    last.unwrap()
}

/// Every row of a step takes the same operations whatever the other rows: a sequence's logits
/// are the same bits whether its prompt is read in one chunk, in chunks of three or a token at
/// a time as decode rows, alone or with a neighbour of another adapter in every step; in f32,
/// bf16, q8_0 and q4_k (q5_0 and q8_0 rows, and the down projections' 256-wide rows in q4_k and
/// q6_k), on the base model and with an adapter.
#[test]
fn a_sequence_gets_the_same_bits_however_its_prompt_is_fed() {
    let cfg: ModelConfig = serde_json::from_value(serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 40, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 64, "tie_word_embeddings": true
    }))
    .unwrap();
    for format in [
        WeightFormat::F32,
        WeightFormat::Bf16,
        WeightFormat::Q8_0,
        WeightFormat::Q4K,
    ] {
        let mut model = tiny_model(&cfg, DType::F32);
        random_lora(&mut model, crate::lora::TARGETABLE, 0.0, false, DType::F32);
        let a1 = model.take_loras();
        random_lora(&mut model, &["q_proj", "v_proj"], 0.0, false, DType::F32);
        let a2 = model.take_loras();
        model.pack(format).unwrap();
        if format == WeightFormat::Q4K {
            let kq = |l: &super::LoraLinear| matches!(l.packed, Some(super::Packed::KQuant(_)));
            assert_eq!(
                model.linears().filter(|l| kq(l)).count(),
                2,
                "the down projections"
            );
        }
        let prompt: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % 40).collect();
        for (adapter, other) in [(None, Some(&a2)), (Some(&a1), Some(&a2)), (Some(&a1), None)] {
            let whole = logits_fed(&model, adapter, other, &prompt, &[12], false);
            let plans: [&[usize]; 3] = [&[3, 3, 3, 3], &[5, 1, 1, 1, 1, 1, 1, 1], &[12]];
            for plan in plans {
                for neighbour in [false, true] {
                    let got = logits_fed(&model, adapter, other, &prompt, plan, neighbour);
                    assert_eq!(
                        max_abs_diff(&got, &whole),
                        0.0,
                        "{format}, adapter {}, plan {plan:?}, neighbour {neighbour}",
                        adapter.is_some()
                    );
                }
            }
        }
    }
}
