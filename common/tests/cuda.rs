//! CUDA against CPU (feature `cuda`, on a machine with a GPU; `scripts/gpu-check.sh` runs these).
//! Not part of `make test`: the default build has no CUDA. Every test fails, rather than
//! passes, when no GPU is found.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, IndexOp, Tensor};
use common::generate::{generate, stop_ids, SamplingParams};
use common::model::ops;
use common::model::{Batch, Grads, TrainCtx};
use common::testing::{ids, max_abs_diff, real_model_dir, reference, write_tiny_model};
use common::{Llama, LoraConfig};
use rand::{Rng, SeedableRng};

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device (these tests need a GPU)")
}

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 4.0 - 2.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Largest difference relative to the largest magnitude of the CPU result.
fn rel(cuda: &Tensor, cpu: &Tensor) -> f64 {
    let c = cuda
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let p = cpu.to_dtype(DType::F32).unwrap();
    let scale = p
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    max_abs_diff(&c, &p) / scale.max(1e-12)
}

/// Every custom op's CUDA kernel (f32 and bf16) against its CPU body on the same inputs
/// (bf16: inputs rounded to bf16 first, CPU in f32).
#[test]
fn every_custom_op_on_cuda_matches_the_cpu() {
    let dev = gpu();
    for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
        let up = |t: &Tensor| t.to_dtype(dt).unwrap().to_device(&dev).unwrap();
        // the CPU sees the same (rounded) values, in f32, in a tensor of its own (the in-place
        // kernels write over their input)
        let cpu = |t: &Tensor| {
            t.to_dtype(dt)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .copy()
                .unwrap()
        };
        let check = |what: &str, g: &Tensor, c: &Tensor| {
            let r = rel(g, c);
            eprintln!("{what} {dt:?}: relative difference {r:.2e}");
            assert!(r < tol, "{what} {dt:?}: CUDA vs CPU {r}");
        };
        let (x, w, dy) = (
            random(&[37, 576], 1),
            random(&[576], 2),
            random(&[37, 576], 3),
        );
        check(
            "rms_norm_backward",
            &ops::rms_norm_backward(&up(&x), &up(&w), 1e-5, &up(&dy)).unwrap(),
            &ops::rms_norm_backward(&cpu(&x), &cpu(&w), 1e-5, &cpu(&dy)).unwrap(),
        );
        let s = random(&[2, 3, 4 * 7, 7 + 5], 4);
        check(
            "causal_softmax",
            &ops::causal_softmax(up(&s), 0.3, 7, 5).unwrap(),
            &ops::causal_softmax(cpu(&s), 0.3, 7, 5).unwrap(),
        );
        let p = ops::causal_softmax(cpu(&s), 0.3, 7, 5).unwrap();
        let dp = random(&[2, 3, 28, 12], 5);
        check(
            "softmax_backward",
            &ops::softmax_backward(&up(&p), up(&dp), 0.3).unwrap(),
            &ops::softmax_backward(&cpu(&p), cpu(&dp), 0.3).unwrap(),
        );
        let (g, u, da) = (
            random(&[33, 1536], 6),
            random(&[33, 1536], 7),
            random(&[33, 1536], 8),
        );
        check(
            "swiglu",
            &ops::swiglu(&up(&g), &up(&u)).unwrap(),
            &ops::swiglu(&cpu(&g), &cpu(&u)).unwrap(),
        );
        let (gg, gu) = ops::swiglu_backward(&up(&g), &up(&u), &up(&da)).unwrap();
        let (cg, cu) = ops::swiglu_backward(&cpu(&g), &cpu(&u), &cpu(&da)).unwrap();
        check("swiglu_backward dg", &gg, &cg);
        check("swiglu_backward du", &gu, &cu);
        let m = ops::DropoutMask::new(7, 11, 3, 0.1);
        check(
            "dropout",
            &ops::dropout(&up(&g), m).unwrap(),
            &ops::dropout(&cpu(&g), m).unwrap(),
        );
        check(
            "add_dropped",
            &ops::add_dropped(up(&u), &up(&g), m).unwrap(),
            &ops::add_dropped(cpu(&u), &cpu(&g), m).unwrap(),
        );
        let logits = random(&[19, 49152], 9);
        let tg: Vec<u32> = (0..19).map(|i| (i * 2579) % 49152).collect();
        let (gt, ct) = (
            Tensor::from_slice(&tg, 19, &dev).unwrap(),
            Tensor::from_slice(&tg, 19, &Device::Cpu).unwrap(),
        );
        let (gl, gg) = ops::cross_entropy(up(&logits), &gt, Some(0.25)).unwrap();
        let (cl, cg) = ops::cross_entropy(cpu(&logits), &ct, Some(0.25)).unwrap();
        check("cross_entropy loss", &gl, &cl);
        check("cross_entropy grad", &gg.unwrap(), &cg.unwrap());
    }
}

/// LoRA gradients of a tiny random model (dropout on): CUDA f32 against the CPU, 1e-4 relative.
#[test]
fn lora_gradients_on_cuda_match_the_cpu() {
    let dev = gpu();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    let cfg = write_tiny_model(&dir, 64, 2, 5).unwrap();
    let lc = LoraConfig::new(
        8,
        16.0,
        0.1,
        common::lora::TARGETABLE
            .iter()
            .map(|s| s.to_string())
            .collect(),
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let ids: Vec<u32> = (0..2 * 33)
        .map(|_| rng.random_range(0..cfg.vocab_size as u32))
        .collect();
    let labels: Vec<i64> = ids
        .iter()
        .enumerate()
        .map(|(i, &t)| if i % 3 == 0 { -100 } else { t as i64 })
        .collect();
    let run = |d: &Device, ckpt: bool| {
        let mut m = Llama::from_dir(&dir, DType::F32, d).unwrap();
        let init = common::lora::initializer(&common::lora::InitLoraWeights::Bool(false), 9, d);
        m.attach_lora(&lc, init).unwrap();
        let bt = Batch {
            input_ids: Tensor::from_slice(&ids, (2, 33), d).unwrap(),
            labels: labels.clone(),
        };
        let ctx = TrainCtx {
            seed: 1,
            micro_step: 4,
            gradient_checkpointing: ckpt,
            neftune_noise_alpha: None,
        };
        let mut g = Grads::new(m.num_loras());
        let loss = m
            .forward_backward(&bt, &ctx, 0.01, &mut g)
            .unwrap()
            .loss_sum;
        (loss, g.into_flat().unwrap())
    };
    let (lc_, gc) = run(&Device::Cpu, false);
    for ckpt in [false, true] {
        let (lg, gg) = run(&dev, ckpt);
        assert!((lg - lc_).abs() < 1e-4 * lc_.abs(), "loss {lg} vs {lc_}");
        for (i, (a, b)) in gg.iter().zip(&gc).enumerate() {
            let r = rel(a, b);
            assert!(r < 1e-4, "gradient {i} (checkpointing {ckpt}): {r}");
        }
    }
}

/// The real SmolLM2: logits on CUDA f32 equal the CPU's within 1e-3; greedy answers in bf16 on
/// CUDA equal the CPU's f32 answers on the oracle prompt.
#[test]
fn real_model_on_cuda_matches_the_cpu() {
    let dev = gpu();
    let dir = real_model_dir().unwrap();
    let r = reference().unwrap();
    let prompt = ids(&r["chat_prompt"]["ids"]);
    let cpu = Llama::from_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    let logits = |m: &Llama, d: &Device| {
        let x = Tensor::new(prompt.as_slice(), d)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        m.forward(&x, None)
            .unwrap()
            .i(0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
    };
    let want = logits(&cpu, &Device::Cpu);
    let g32 = Llama::from_dir(&dir, DType::F32, &dev).unwrap();
    let d = max_abs_diff(&logits(&g32, &dev), &want);
    eprintln!("max |logit CUDA f32 - CPU f32| = {d:.2e}");
    assert!(d < 1e-3, "CUDA f32 logits differ by {d}");
    let tok = common::tokenizer::load(&dir).unwrap();
    let eot = common::chat::ChatTemplate::from_model_dir(&dir)
        .unwrap()
        .end_of_turn(&tok)
        .unwrap();
    let stops = stop_ids(&dir, &eot);
    let p = SamplingParams {
        max_new_tokens: 24,
        ..Default::default()
    };
    let text = |m: &Llama| {
        let g = generate(m, &prompt, &p, &stops, |_| Ok(true)).unwrap();
        common::tokenizer::decode(&tok, &g.ids).unwrap()
    };
    let on_cpu = text(&cpu);
    assert_eq!(text(&g32), on_cpu);
    let g16 = Llama::from_dir(&dir, DType::BF16, &dev).unwrap();
    assert_eq!(text(&g16), on_cpu, "bf16 on CUDA");
    eprintln!("greedy: {on_cpu:?}");
}
