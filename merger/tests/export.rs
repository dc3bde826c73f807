//! export-gguf on the real SmolLM2: an f16 export re-imported gives the same weights (to f16
//! rounding) and the same token ids; an independent reader (candle-transformers' quantized
//! Llama) generates from the q8_0 export, with an adapter merged, what infer generates from the
//! merged model directory; what cannot be exported faithfully is refused.

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, IndexOp, Tensor};
use common::testing::{f32_values, ids, real_model_dir, reference};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

fn run(bin: &str, args: &[&str]) -> (i32, String) {
    let o = Command::new(bin)
        .args(args)
        .env("DIALORA_NO_BAR", "1")
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stderr).to_string() + &String::from_utf8_lossy(&o.stdout),
    )
}

fn export(args: &[&str]) -> (i32, String) {
    run(env!("CARGO_BIN_EXE_export-gguf"), args)
}

/// `import-gguf --gguf GGUF --output OUT`, which must succeed.
fn import(gguf: &Path, out: &Path) {
    let (code, log) = run(
        env!("CARGO_BIN_EXE_import-gguf"),
        &[
            "--gguf",
            gguf.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{log}");
}

#[test]
fn an_f16_export_imports_back_to_the_same_weights_and_token_ids() {
    let real = real_model_dir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("m.f16.gguf");
    let (code, log) = export(&[
        "--model",
        real.to_str().unwrap(),
        "-o",
        gguf.to_str().unwrap(),
        "--type",
        "f16",
    ]);
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("F32") && log.contains("F16"), "{log}");
    // the header: GGUF v3, llama.cpp's keys
    let bytes = std::fs::read(&gguf).unwrap();
    assert_eq!(&bytes[..4], b"GGUF");
    assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 3);
    let content = gguf_file::Content::read(&mut std::fs::File::open(&gguf).unwrap()).unwrap();
    let md = &content.metadata;
    assert_eq!(md["general.architecture"].to_string().unwrap(), "llama");
    assert_eq!(md["tokenizer.ggml.pre"].to_string().unwrap(), "smollm");
    assert_eq!(md["llama.block_count"].to_u32().unwrap(), 30);
    assert_eq!(md["llama.attention.head_count_kv"].to_u32().unwrap(), 3);
    assert!(md["tokenizer.chat_template"]
        .to_string()
        .unwrap()
        .contains("<|im_start|>"));
    assert!(
        !content.tensor_infos.contains_key("output.weight"),
        "tied: no output matrix"
    );
    // re-imported: the weights to f16 rounding, the tokenizer to the HF oracle's ids
    let back = tmp.path().join("back");
    import(&gguf, &back);
    let a = common::weights::SafetensorsStore::open_dir(&real).unwrap();
    let b = common::weights::SafetensorsStore::open_dir(&back).unwrap();
    let names: Vec<String> = a.names().cloned().collect();
    assert_eq!(names, b.names().cloned().collect::<Vec<_>>());
    for n in &names {
        let x = a.load(n, DType::F32, &Device::Cpu).unwrap();
        let y = b.load(n, DType::F32, &Device::Cpu).unwrap();
        let want = if x.rank() == 1 {
            x // norms stay f32
        } else {
            x.to_dtype(DType::F16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        assert_eq!(common::testing::max_abs_diff(&want, &y), 0.0, "{n}");
    }
    let r = reference().unwrap();
    let tok = common::tokenizer::load(&back).unwrap();
    for (name, e) in r["texts"].as_object().unwrap() {
        let text = e["text"].as_str().unwrap();
        assert_eq!(
            common::tokenizer::encode(&tok, text).unwrap(),
            ids(&e["ids"]),
            "{name}"
        );
    }
    let cfg = |d: &Path| common::ModelConfig::from_dir(d).unwrap();
    let (c1, c2) = (cfg(&real), cfg(&back));
    assert_eq!(
        (
            c1.hidden_size,
            c1.num_kv_heads(),
            c1.rope_theta(),
            c1.max_position_embeddings
        ),
        (
            c2.hidden_size,
            c2.num_kv_heads(),
            c2.rope_theta(),
            c2.max_position_embeddings
        )
    );
}

/// A random adapter on q,v,down with a visible effect.
fn random_adapter(dir: &Path, real: &Path) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut uniform = |shape: (usize, usize)| {
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| 0.035 * (rng.random::<f32>() * 2.0 - 1.0)) // uniform, std 0.02
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let cfg = common::ModelConfig::from_dir(real).unwrap();
    let mut w = BTreeMap::new();
    for i in 0..cfg.num_hidden_layers {
        for (m, inp, out) in [
            ("self_attn.q_proj", 576, 576),
            ("self_attn.v_proj", 576, 192),
            ("mlp.down_proj", 1536, 576),
        ] {
            let a = uniform((4, inp));
            let b = uniform((out, 4));
            w.insert(format!("model.layers.{i}.{m}"), (a, b));
        }
    }
    let c = common::LoraConfig::new(
        4,
        8.0,
        0.0,
        vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
    );
    common::Adapter::save(&c, &w, dir).unwrap();
}

/// Greedy decoding with candle-transformers' quantized Llama (the GGUF reader of candle's
/// examples): an implementation independent of dialora's model.
fn greedy_from_gguf(gguf: &Path, prompt: &[u32], max_new: usize, stop: u32) -> Vec<u32> {
    use candle_transformers::models::quantized_llama::ModelWeights;
    let mut f = std::fs::File::open(gguf).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut m = ModelWeights::from_gguf(content, &mut f, &Device::Cpu).unwrap();
    let argmax = |l: &Tensor| -> u32 {
        let v: Vec<f32> = l
            .i(0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap() as u32
    };
    let x = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut next = argmax(&m.forward(&x, 0).unwrap());
    let mut out = vec![next];
    while next != stop && out.len() < max_new {
        let x = Tensor::new(&[next], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        next = argmax(&m.forward(&x, prompt.len() + out.len() - 1).unwrap());
        out.push(next);
    }
    out
}

/// The merged model directory and GGUF exports of it (types `tys`), with a random adapter.
fn merged_and_exports(tmp: &Path, tys: &[&str]) -> (std::path::PathBuf, Vec<std::path::PathBuf>) {
    let real = real_model_dir().unwrap();
    let ad = tmp.join("adapter");
    random_adapter(&ad, &real);
    let mut files = Vec::new();
    for ty in tys {
        let gguf = tmp.join(format!("m.{ty}.gguf"));
        let (code, log) = export(&[
            "--model",
            real.to_str().unwrap(),
            "--adapter",
            ad.to_str().unwrap(),
            "-o",
            gguf.to_str().unwrap(),
            "--type",
            ty,
        ]);
        assert_eq!(code, 0, "{log}");
        assert!(log.contains("90 adapter modules merged"), "{log}");
        files.push(gguf);
    }
    let merged = tmp.join("merged");
    common::merge::merge(
        &common::merge::MergeOptions {
            base: real,
            adapter: ad,
            output: merged.clone(),
            dtype: None,
            max_shard_size: u64::MAX,
            overwrite: false,
        },
        |_, _| {},
    )
    .unwrap();
    (merged, files)
}

#[test]
fn an_independent_reader_generates_from_the_export_what_infer_does() {
    // f16 keeps what the model computes (logits within ~0.02 of f32), so greedy text is a
    // faithful check of the whole file: names, Q/K order, hyper-parameters, merged weights
    let tmp = tempfile::tempdir().unwrap();
    let (merged, files) = merged_and_exports(tmp.path(), &["f16"]);
    let p = common::generate::SamplingParams {
        max_new_tokens: 40,
        ..Default::default()
    };
    let o = common::infer::ModelOptions::default();
    let s = common::infer::Session::open(&merged, &[], None, None, &o, p.clone()).unwrap();
    let r = reference().unwrap();
    for key in ["chat_prompt", "multi_turn_prompt"] {
        let prompt = ids(&r[key]["ids"]);
        let g = s
            .engine
            .generate(
                common::engine::Request::new(prompt.clone(), None, p.clone()),
                |_| {},
            )
            .unwrap();
        let from_gguf = greedy_from_gguf(&files[0], &prompt, 40, 2);
        let text = |v: &[u32]| common::tokenizer::decode(&s.tok, v).unwrap();
        assert_eq!(text(&from_gguf), text(&g.ids), "{key}");
    }
}

#[test]
fn quantized_exports_hold_the_merged_weights_to_their_rounding() {
    let tmp = tempfile::tempdir().unwrap();
    let (merged, files) = merged_and_exports(tmp.path(), &["q8_0", "q4_k_m"]);
    let want = common::weights::SafetensorsStore::open_dir(&merged).unwrap();
    for (gguf, bits) in files.iter().zip([8.0f32, 4.0]) {
        let back = tmp.path().join(format!(
            "{}-back",
            gguf.file_name().unwrap().to_string_lossy()
        ));
        import(gguf, &back);
        let got = common::weights::SafetensorsStore::open_dir(&back).unwrap();
        for n in want.names() {
            let w = f32_values(&want, n);
            let g = f32_values(&got, n);
            if !n.ends_with("proj.weight") && n != "model.embed_tokens.weight" {
                assert_eq!(w, g, "{n}: norms stay f32");
                continue;
            }
            // each value within one quantization step of its 32-value block (q8_0: the block's
            // largest magnitude / 127; the 4-bit types' steps are coarser)
            for (wb, gb) in w.chunks(32).zip(g.chunks(32)) {
                let max = wb.iter().fold(0f32, |m, x| m.max(x.abs()));
                let step = max / (2f32.powf(bits - 1.0) - 1.0);
                let err = wb
                    .iter()
                    .zip(gb)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    err <= step * 1.01 + 1e-6,
                    "{}: {n}: error {err} over a step of {step}",
                    gguf.display()
                );
            }
        }
    }
}

#[test]
fn what_cannot_be_exported_faithfully_is_refused() {
    let real = real_model_dir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let copy = |name: &str| {
        let d = tmp.path().join(name);
        std::fs::create_dir(&d).unwrap();
        for f in std::fs::read_dir(&real).unwrap() {
            let f = f.unwrap().path();
            std::os::unix::fs::symlink(&f, d.join(f.file_name().unwrap())).unwrap();
        }
        d
    };
    let edit = |d: &Path, file: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let p = d.join(file);
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        std::fs::remove_file(&p).unwrap();
        f(&mut v);
        std::fs::write(&p, v.to_string()).unwrap();
    };
    let out = tmp.path().join("x.gguf");
    let o = out.to_str().unwrap();
    // llama3 RoPE scaling
    let d = copy("llama3rope");
    edit(&d, "config.json", &|v| {
        v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0});
    });
    let (code, log) = export(&["--model", d.to_str().unwrap(), "-o", o]);
    assert_eq!(code, 1);
    assert!(log.contains("RoPE scaling 'llama3'"), "{log}");
    // a pre-tokenizer llama.cpp would name differently than dialora can check
    let d = copy("pretok");
    edit(&d, "tokenizer.json", &|v| {
        v["pre_tokenizer"] = serde_json::json!({"type": "Whitespace"});
    });
    let (code, log) = export(&["--model", d.to_str().unwrap(), "-o", o]);
    assert_eq!(code, 1);
    assert!(
        log.contains("tokenizer.json") && log.contains("pre-tokenizer"),
        "{log}"
    );
    assert!(!out.exists());
    // an existing output is kept unless --overwrite
    std::fs::write(&out, b"keep").unwrap();
    let (code, log) = export(&["--model", real.to_str().unwrap(), "-o", o]);
    assert_eq!(code, 1);
    assert!(log.contains("--overwrite"), "{log}");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep");
}

/// An output directory the user may not write into: merger and export-gguf say so in one line
/// naming the path, exit non-zero, and leave nothing behind (run unprivileged: root would write
/// anyway). A truncated GGUF gives import-gguf's one-line error, no backtrace, even with
/// RUST_BACKTRACE=1.
#[test]
fn unwritable_outputs_and_damaged_inputs_are_one_line_errors() {
    use common::testing::{read_only_dir, unprivileged};
    let real = real_model_dir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    random_adapter(&adapter, &real);
    let ro = read_only_dir(tmp.path());
    let q8_args = |out: &Path| -> Vec<String> {
        [
            "--model",
            real.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--type",
            "q8_0",
        ]
        .map(String::from)
        .to_vec()
    };
    let cases = [
        (
            env!("CARGO_BIN_EXE_merger"),
            vec![
                "--base".to_string(),
                real.display().to_string(),
                "--adapter".into(),
                adapter.display().to_string(),
                "--output".into(),
                ro.join("merged").display().to_string(),
            ],
        ),
        (
            env!("CARGO_BIN_EXE_export-gguf"),
            q8_args(&ro.join("m.gguf")),
        ),
    ];
    for (bin, args) in &cases {
        let o = unprivileged(Path::new(bin), tmp.path())
            .args(args)
            .env("DIALORA_NO_BAR", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{bin}: {err}");
        assert_eq!(err.lines().count(), 1, "{bin}: one line: {err}");
        assert!(
            err.contains("error") && err.contains(ro.to_str().unwrap()),
            "{bin}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(
            std::fs::read_dir(&ro).unwrap().count(),
            0,
            "{bin} left files"
        );
    }
    // a GGUF cut short
    let gguf = tmp.path().join("m.gguf");
    let (code, log) = export(
        &q8_args(&gguf)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(code, 0, "{log}");
    let bytes = std::fs::read(&gguf).unwrap();
    std::fs::write(&gguf, &bytes[..bytes.len() / 3]).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_import-gguf"))
        .args(["--gguf", gguf.to_str().unwrap(), "--output"])
        .arg(tmp.path().join("imported"))
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "no backtrace: {err}");
    assert!(err.contains("m.gguf"), "{err}");
    assert!(!tmp.path().join("imported").exists());
}
