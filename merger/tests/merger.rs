//! merger: exact W' on a tiny model, logits of the merged real model, sharding, refusals.

use candle_core::{DType, Device, IndexOp, Tensor};
use common::lora::{Adapter, LoraConfig};
use common::testing::{f32_values, max_abs_diff, real_model_dir, write_tiny_model};
use common::weights::SafetensorsStore;
use common::Llama;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

fn merger(args: &[&str]) -> (i32, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_merger"))
        .args(args)
        .env("DIALORA_NO_BAR", "1")
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stderr).to_string() + &String::from_utf8_lossy(&o.stdout),
    )
}

/// An adapter with exactly representable entries (multiples of 1/8), so W + s*B*A is exact.
fn exact_adapter(
    dir: &Path,
    modules: &[(&str, usize, usize)],
    r: usize,
    alpha: f64,
) -> BTreeMap<String, (Tensor, Tensor)> {
    let mut w = BTreeMap::new();
    for (k, (m, i, o)) in modules.iter().enumerate() {
        let a: Vec<f32> = (0..r * i)
            .map(|j| (((j * 7 + k) % 9) as f32 - 4.0) / 8.0)
            .collect();
        let b: Vec<f32> = (0..o * r)
            .map(|j| (((j * 5 + k) % 7) as f32 - 3.0) / 8.0)
            .collect();
        w.insert(
            m.to_string(),
            (
                Tensor::from_vec(a, (r, *i), &Device::Cpu).unwrap(),
                Tensor::from_vec(b, (*o, r), &Device::Cpu).unwrap(),
            ),
        );
    }
    let cfg = LoraConfig::new(r, alpha, 0.0, vec!["q_proj".into(), "down_proj".into()]);
    Adapter::save(&cfg, &w, dir).unwrap();
    w
}

#[test]
fn known_a_b_give_exact_merged_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let cfg = write_tiny_model(&base, 32, 2, 9).unwrap();
    let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
    let ad = tmp.path().join("adapter");
    let mods = [
        ("model.layers.0.self_attn.q_proj", d, d),
        ("model.layers.1.mlp.down_proj", f, d),
    ];
    let w = exact_adapter(&ad, &mods, 2, 4.0);
    let out = tmp.path().join("merged");
    let (code, log) = merger(&[
        "--base",
        base.to_str().unwrap(),
        "--adapter",
        ad.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{log}");
    let b = SafetensorsStore::open_dir(&base).unwrap();
    let m = SafetensorsStore::open_dir(&out).unwrap();
    for name in b.names() {
        let wb = f32_values(&b, name);
        let wm = f32_values(&m, name);
        let module = name.strip_suffix(".weight").unwrap();
        match w.get(module) {
            None => assert_eq!(wb, wm, "{name} must be copied unchanged"),
            Some((a, bm)) => {
                let (r, inp) = a.dims2().unwrap();
                let av: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
                let bv: Vec<f32> = bm.flatten_all().unwrap().to_vec1().unwrap();
                let out_dim = wb.len() / inp;
                for o in 0..out_dim {
                    for i in 0..inp {
                        let delta: f32 =
                            (0..r).map(|k| bv[o * r + k] * av[k * inp + i]).sum::<f32>() * 2.0; // alpha/r = 4/2
                        assert_eq!(wm[o * inp + i], wb[o * inp + i] + delta, "{name}[{o},{i}]");
                    }
                }
            }
        }
    }
    // side files are copied and the merge is recorded
    for f in [
        "config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "dialora_merge.json",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    let rec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("dialora_merge.json")).unwrap())
            .unwrap();
    assert_eq!(rec["merged_modules"], 2);
}

#[test]
fn merged_real_model_matches_base_plus_adapter() {
    let real = real_model_dir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // a trained adapter: a few real steps on the sample data
    let data = common::testing::sample_shards(tmp.path(), 128, 0.0).unwrap();
    let ad = tmp.path().join("adapter");
    let args = common::train::args::TrainArgs {
        model: real.clone(),
        data,
        output_dir: ad.clone(),
        lora_r: 8,
        lora_alpha: 16.0,
        target_modules: "all-linear".into(),
        learning_rate: 1e-3,
        max_steps: 3,
        per_device_train_batch_size: 2,
        lr_scheduler_type: common::train::schedule::SchedulerType::Constant,
        save_steps: 0,
        seed: 3,
        ..Default::default()
    };
    struct Quiet;
    impl common::train::Reporter for Quiet {
        fn line(&mut self, _: &str) {}
    }
    let mut t = common::train::Trainer::new(args).unwrap();
    t.run(std::sync::Arc::new(false.into()), &mut Quiet)
        .unwrap();

    let ids: Vec<u32> = vec![
        1, 9690, 198, 2683, 359, 253, 5356, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 2, 198, 1,
        520, 9531, 198,
    ];
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    // The comparison runs the forward in f64: the f32 weights (base, adapter, merged output)
    // are upcast exactly, so what is measured is the merge, not f32 forward-pass noise (which
    // is ~1e-4 on these ~30-magnitude logits whatever the weights; printed below).
    let unmerged_at = |dt: DType| {
        let mut m = Llama::from_dir(&real, dt, &Device::Cpu).unwrap();
        m.attach_adapter(&Adapter::load(&ad, dt, &Device::Cpu).unwrap(), &real)
            .unwrap();
        m.forward(&x, None).unwrap().to_dtype(DType::F64).unwrap()
    };
    let want = unmerged_at(DType::F64);
    let want32 = unmerged_at(DType::F32);
    let base = Llama::from_dir(&real, DType::F64, &Device::Cpu)
        .unwrap()
        .forward(&x, None)
        .unwrap();
    let effect = max_abs_diff(&want, &base);
    assert!(
        effect > 1e-2,
        "the trained adapter must change the logits ({effect})"
    );

    for (dtype, shard, tol) in [("f32", "5GB", 1e-4f64), ("bf16", "100MB", 1.0)] {
        let out = tmp.path().join(format!("merged-{dtype}"));
        let (code, log) = merger(&[
            "--base",
            real.to_str().unwrap(),
            "--adapter",
            ad.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--dtype",
            dtype,
            "--max-shard-size",
            shard,
        ]);
        assert_eq!(code, 0, "{log}");
        let got = Llama::from_dir(&out, DType::F64, &Device::Cpu)
            .unwrap()
            .forward(&x, None)
            .unwrap();
        let diff = max_abs_diff(&got, &want);
        let got32 = Llama::from_dir(&out, DType::F32, &Device::Cpu)
            .unwrap()
            .forward(&x, None)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let diff32 = max_abs_diff(&got32, &want32);
        eprintln!("{dtype}: max |merged - base+adapter| logit = {diff:.3e} (f64 forward), {diff32:.3e} (f32 forward)");
        assert!(diff < tol, "{dtype}: {diff}");
        let last = |t: &Tensor| {
            t.i((0, ids.len() - 1))
                .unwrap()
                .argmax(0)
                .unwrap()
                .to_scalar::<u32>()
                .unwrap()
        };
        assert_eq!(last(&got), last(&want), "{dtype}: next token");
        if dtype == "bf16" {
            assert!(
                out.join("model.safetensors.index.json").exists(),
                "100MB shards for a 270MB model"
            );
            let cfg: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                    .unwrap();
            assert_eq!(cfg["torch_dtype"], "bfloat16");
        }
    }
}

#[test]
fn refusals_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let cfg = write_tiny_model(&base, 32, 2, 1).unwrap();
    let d = cfg.hidden_size;
    let ad = tmp.path().join("adapter");
    exact_adapter(&ad, &[("model.layers.0.self_attn.q_proj", d, d)], 2, 4.0);
    let run = |out: &Path, adapter: &Path, extra: &[&str]| {
        let mut a = vec![
            "--base",
            base.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        merger(&a)
    };
    let check = |(code, log): (i32, String), want: &str| {
        assert_ne!(code, 0, "{want}");
        assert!(log.contains(want), "want '{want}' in {log}");
    };
    check(run(&base, &ad, &[]), "must not be the base model directory");
    check(
        run(&base.join("sub"), &ad, &[]),
        "must not be the base model directory or inside it",
    );
    check(
        run(tmp.path(), &ad, &["--overwrite"]),
        "must not contain the base model directory",
    );
    let busy = tmp.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("x"), "keep").unwrap();
    check(run(&busy, &ad, &[]), "not empty (use --overwrite");
    assert_eq!(std::fs::read_to_string(busy.join("x")).unwrap(), "keep");
    // shapes that do not fit (an adapter for a wider model)
    let wide = tmp.path().join("wide");
    exact_adapter(
        &wide,
        &[("model.layers.0.self_attn.q_proj", 64, 64)],
        2,
        4.0,
    );
    check(
        run(&tmp.path().join("o1"), &wide, &[]),
        "do not fit the base weight",
    );
    // more layers than the base has
    let deep = tmp.path().join("deep");
    exact_adapter(&deep, &[("model.layers.7.self_attn.q_proj", d, d)], 2, 4.0);
    check(
        run(&tmp.path().join("o2"), &deep, &[]),
        "is in layer 7 but the base",
    );
    // DoRA and other adapter types
    for (key, val, want) in [
        ("use_dora", serde_json::json!(true), "DoRA"),
        ("peft_type", serde_json::json!("IA3"), "peft_type 'IA3'"),
    ] {
        let odd = tmp.path().join(format!("odd-{key}"));
        std::fs::create_dir_all(&odd).unwrap();
        std::fs::copy(
            ad.join("adapter_model.safetensors"),
            odd.join("adapter_model.safetensors"),
        )
        .unwrap();
        let mut c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(ad.join("adapter_config.json")).unwrap())
                .unwrap();
        c[key] = val;
        std::fs::write(odd.join("adapter_config.json"), c.to_string()).unwrap();
        check(run(&tmp.path().join(format!("o-{key}")), &odd, &[]), want);
    }
    for o in ["o1", "o2", "o-use_dora", "o-peft_type"] {
        assert!(!tmp.path().join(o).exists(), "{o} written despite refusal");
    }
    assert!(!std::fs::read_dir(tmp.path()).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("partial")));
    // PEFT's own key naming (`.default`) merges, and a symlink in the base is not followed
    let peft = tmp.path().join("peft");
    std::fs::create_dir_all(&peft).unwrap();
    std::fs::copy(
        ad.join("adapter_config.json"),
        peft.join("adapter_config.json"),
    )
    .unwrap();
    let st = SafetensorsStore::open_files(&[ad.join("adapter_model.safetensors")]).unwrap();
    let mut t = BTreeMap::new();
    for n in st.names() {
        t.insert(
            n.replace(".weight", ".default.weight"),
            st.load(n, DType::F32, &Device::Cpu).unwrap(),
        );
    }
    common::weights::save(&t, &peft.join("adapter_model.safetensors")).unwrap();
    std::fs::write(tmp.path().join("secret.txt"), "outside").unwrap();
    std::os::unix::fs::symlink(tmp.path().join("secret.txt"), base.join("notes.txt")).unwrap();
    let out = tmp.path().join("ok");
    let (code, log) = run(&out, &peft, &[]);
    assert_eq!(code, 0, "{log}");
    assert!(
        !out.join("notes.txt").exists(),
        "symlink followed out of the base directory"
    );
}

/// The two fixture directories of scripts/make-bin-fixture.py (the same tensors as PyTorch
/// `.bin` shards with their index, and as safetensors), copied into `tmp` with the real
/// model's tokenizer and chat template beside them.
fn bin_and_safetensors_models(tmp: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let real = real_model_dir().unwrap();
    let fixtures = common::testing::repo_root().join("common/tests/fixtures");
    let mut dirs = Vec::new();
    for name in ["bin-model", "bin-model-safetensors"] {
        // one directory name for both: GGUF files carry it (general.name)
        let d = tmp.join(name).join("model");
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(fixtures.join(name)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        common::testing::copy_tokenizer(&real, &d).unwrap();
        dirs.push(d);
    }
    (dirs[0].clone(), dirs[1].clone())
}

/// A model directory of PyTorch `.bin` shards (as transformers 4.x's
/// `save_pretrained(safe_serialization=False)` writes them) loads as its safetensors twin
/// does: the same logits; merger and export-gguf write the same files from either; with both
/// formats present safetensors is used; damaged or foreign checkpoints are named.
#[test]
fn pytorch_bin_checkpoints_load_as_safetensors_do() {
    let tmp = tempfile::tempdir().unwrap();
    let (bin, st) = bin_and_safetensors_models(tmp.path());
    let ids = Tensor::new(&[[1u32, 520, 9000, 33, 48000, 7]], &Device::Cpu).unwrap();
    let logits = |d: &Path| {
        Llama::from_dir(d, DType::F32, &Device::Cpu)
            .unwrap()
            .forward(&ids, None)
            .unwrap()
    };
    let (a, b) = (logits(&bin), logits(&st));
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    // merger and export-gguf: the same bytes from either base
    let adapter = tmp.path().join("adapter");
    exact_adapter(
        &adapter,
        &[
            ("model.layers.0.self_attn.q_proj", 16, 16),
            ("model.layers.1.mlp.down_proj", 32, 16),
        ],
        2,
        4.0,
    );
    let mut outputs = Vec::new();
    for base in [&bin, &st] {
        let which = base
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy();
        let out = tmp.path().join(format!("merged-{which}"));
        let (code, log) = merger(&[
            "--base",
            base.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{log}");
        let gguf = tmp.path().join(format!("{which}.gguf"));
        let o = Command::new(env!("CARGO_BIN_EXE_export-gguf"))
            .args(["--model", base.to_str().unwrap(), "--type", "q8_0", "-o"])
            .arg(&gguf)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        outputs.push((out, gguf));
    }
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(
        weights(&outputs[0].0) == weights(&outputs[1].0),
        "merged weights differ"
    );
    assert!(
        std::fs::read(&outputs[0].1).unwrap() == std::fs::read(&outputs[1].1).unwrap(),
        "GGUF exports differ"
    );
    // both formats in one directory: safetensors, as transformers (the .bin here is junk)
    std::fs::write(st.join("pytorch_model.bin"), b"not a checkpoint").unwrap();
    assert_eq!(max_abs_diff(&logits(&st), &b), 0.0);
    // refusals name the file (and the tensor)
    let fixtures = common::testing::repo_root().join("common/tests/fixtures");
    let fail = |d: &Path| match SafetensorsStore::open_dir(d) {
        Ok(_) => panic!("{} opened", d.display()),
        Err(e) => format!("{e:#}"),
    };
    let lone = tmp.path().join("lone");
    std::fs::create_dir_all(&lone).unwrap();
    std::fs::copy(
        fixtures.join("not-a-state-dict.bin"),
        lone.join("pytorch_model.bin"),
    )
    .unwrap();
    let e = fail(&lone);
    assert!(
        e.contains("pytorch_model.bin") && e.contains("not a PyTorch state dict"),
        "{e}"
    );
    std::fs::write(lone.join("pytorch_model.bin"), b"not a zip").unwrap();
    let e = fail(&lone);
    assert!(
        e.contains("pytorch_model.bin: not a PyTorch checkpoint"),
        "{e}"
    );
    let index = bin.join("pytorch_model.bin.index.json");
    let text = std::fs::read_to_string(&index).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["weight_map"]["model.extra.weight"] = "pytorch_model-00002-of-00002.bin".into();
    std::fs::write(&index, v.to_string()).unwrap();
    let e = fail(&bin);
    assert!(
        e.contains("'model.extra.weight'") && e.contains("00002-of-00002.bin"),
        "{e}"
    );
    std::fs::write(&index, &text).unwrap();
    std::fs::remove_file(bin.join("pytorch_model-00002-of-00002.bin")).unwrap();
    let e = fail(&bin);
    assert!(
        e.contains("pytorch_model-00002-of-00002.bin: missing"),
        "{e}"
    );
}
