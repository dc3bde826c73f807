//! infer on the real SmolLM2: the oracle answer, adapter vs merged generation, multi-turn
//! input, chat REPL, sampling determinism, and clear errors.

use candle_core::{DType, Device, Tensor};
use common::data::formats::{parse_record, Location, Purpose};
use common::generate::SamplingParams;
use common::infer::{ModelOptions, Session};
use common::lora::{Adapter, LoraConfig};
use common::testing::real_model_dir;
use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

fn infer(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_infer"));
    c.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    } else {
        drop(child.stdin.take());
    }
    let o = child.wait_with_output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

#[test]
fn oracle_prompt_with_and_without_kv_cache() {
    let m = real_model_dir().unwrap();
    for extra in [None, Some("--no-kv-cache")] {
        let mut a = vec![
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            "What is the capital of France?",
        ];
        a.extend(extra);
        let (code, out, err) = infer(&a, None);
        assert_eq!(code, 0, "{err}");
        assert_eq!(out, "The capital of France is Paris.\n");
        assert!(
            err.contains("stopped at end of turn") && err.contains("tokens/s"),
            "{err}"
        );
    }
}

/// A random adapter with a visible effect.
fn random_adapter(dir: &std::path::Path, model: &common::Llama) {
    let mut w = BTreeMap::new();
    let mut k = 0u32;
    for l in model.linears() {
        if !(l.name.ends_with("q_proj") || l.name.ends_with("v_proj")) {
            continue;
        }
        k += 1;
        let (o, i) = (l.out_dim(), l.in_dim());
        let a: Vec<f32> = (0..4 * i)
            .map(|j| {
                ((((j as u32).wrapping_mul(2654435761) ^ k) % 1000) as f32 / 1000.0 - 0.5) * 0.1
            })
            .collect();
        let b: Vec<f32> = (0..o * 4)
            .map(|j| ((((j as u32).wrapping_mul(40503) ^ k) % 1000) as f32 / 1000.0 - 0.5) * 0.1)
            .collect();
        w.insert(
            l.name.clone(),
            (
                Tensor::from_vec(a, (4, i), &Device::Cpu).unwrap(),
                Tensor::from_vec(b, (o, 4), &Device::Cpu).unwrap(),
            ),
        );
    }
    Adapter::save(
        &LoraConfig::new(4, 8.0, 0.0, vec!["q_proj".into(), "v_proj".into()]),
        &w,
        dir,
    )
    .unwrap();
}

#[test]
fn adapter_generation_equals_merged_generation() {
    let m = real_model_dir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ad = tmp.path().join("adapter");
    let base = common::Llama::from_dir(&m, DType::F32, &Device::Cpu).unwrap();
    random_adapter(&ad, &base);
    drop(base);
    let merged = tmp.path().join("merged");
    common::merge::merge(
        &common::merge::MergeOptions {
            base: m.clone(),
            adapter: ad.clone(),
            output: merged.clone(),
            dtype: None,
            max_shard_size: u64::MAX,
            overwrite: false,
        },
        |_, _| {},
    )
    .unwrap();
    let p = SamplingParams {
        max_new_tokens: 24,
        ..Default::default()
    };
    let o = ModelOptions::default();
    let named = [("ad".to_string(), ad.clone())];
    let with_adapter = Session::open(&m, &named, Some("ad"), None, &o, p.clone()).unwrap();
    let merged_s = Session::open(&merged, &[], None, None, &o, p.clone()).unwrap();
    let conv = parse_record(
        &serde_json::json!({"turns": ["What is the capital of France?", "Tell me one fact about it.", "I feel tired today."]}),
        Location {
            file: "t".into(),
            index: 1,
            is_line: true,
        },
        Purpose::Prompting,
    )
    .unwrap();
    // the adapter's and the base's answers in one batch
    let mut ac = with_adapter.answer_all(&[&conv], None, &[Some("ad".into()), None], |_, _| {});
    let mut ac = ac.remove(0).into_iter();
    let (a, c) = (ac.next().unwrap().unwrap(), ac.next().unwrap().unwrap());
    let b = merged_s.answer_all(&[&conv], None, &[None], |_, _| {});
    let b = b
        .into_iter()
        .next()
        .unwrap()
        .into_iter()
        .next()
        .unwrap()
        .unwrap();
    for i in 0..3 {
        assert_eq!(a[i].text, b[i].text, "turn {i}: adapter vs merged");
    }
    assert!(
        (0..3).any(|i| a[i].text != c[i].text),
        "the adapter changes generations"
    );
}

#[test]
fn multi_turn_input_chat_and_sampling() {
    let m = real_model_dir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"conversation\":[{\"input\":\"What is the capital of France?\",\"output\":\"\"},{\"input\":\"And of Italy?\",\"output\":\"\"}]}\n{\"turns\":[\"Say hello.\",\"Say goodbye.\"]}\n",
    )
    .unwrap();
    let out = tmp.path().join("out.jsonl");
    let (code, _, err) = infer(
        &[
            "--model",
            m.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--max-new-tokens",
            "40",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for l in &lines {
        let turns = l["turns"].as_array().unwrap();
        assert_eq!(turns.len(), 2);
        for t in turns {
            assert!(!t["assistant"].as_str().unwrap().is_empty(), "{l}");
        }
    }
    assert!(lines[0]["turns"][0]["assistant"]
        .as_str()
        .unwrap()
        .contains("Paris"));
    assert!(
        lines[0]["turns"][1]["assistant"]
            .as_str()
            .unwrap()
            .contains("Rome"),
        "the history carries the model's first answer: {}",
        lines[0]
    );
    assert!(
        err.contains("replies") && err.contains("end-of-turn token"),
        "{err}"
    );

    // chat REPL on piped stdin
    let (code, out, err) = infer(
        &[
            "--model",
            m.to_str().unwrap(),
            "--chat",
            "--max-new-tokens",
            "30",
        ],
        Some("What is the capital of France?\nAnd of Italy?\n/history\n/hsitory\n/reset\n/history\n/system You are terse.\n/quit\nnot read\n"),
    );
    assert_eq!(code, 0, "{err}");
    // the second answer knows the first exchange: earlier turns are in the prompt
    let (first, rest) = out.split_once('\n').unwrap();
    assert!(first.contains("Paris"), "{out}");
    assert!(rest.contains("Rome"), "{out}");
    // /history shows every turn the model was given, the replies included
    assert!(
        out.contains("user: What is the capital of France?\nassistant: ")
            && out.contains("user: And of Italy?\nassistant: "),
        "{out}"
    );
    // an unknown command gets help and does not reach the model
    assert!(
        out.contains("unknown command /hsitory") && out.contains("/history shows"),
        "{out}"
    );
    assert!(
        out.contains("history cleared\n(empty conversation)") && out.contains("system prompt set"),
        "{out}"
    );
    // two replies only: nothing after /quit was read, no command went to the model
    assert_eq!(err.matches("tokens/s").count(), 2, "{err}");

    // sampling is deterministic for a seed, and differs across seeds
    let sample = |seed: &str| {
        let (code, out, err) = infer(
            &[
                "--model",
                m.to_str().unwrap(),
                "--prompt",
                "Write a word.",
                "--temperature",
                "1.2",
                "--top-p",
                "0.95",
                "--top-k",
                "50",
                "--seed",
                seed,
                "--max-new-tokens",
                "12",
            ],
            None,
        );
        assert_eq!(code, 0, "{err}");
        out
    };
    assert_eq!(sample("7"), sample("7"));
    assert!(
        (1..6).any(|s| sample(&s.to_string()) != sample("7")),
        "different seeds give different samples"
    );
}

#[test]
fn errors_are_clear() {
    let m = real_model_dir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ms = m.to_str().unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--model".into(),
                tmp.path().to_str().unwrap().into(),
                "--prompt".into(),
                "hi".into(),
            ],
            "config.json: cannot read model config",
        ),
        (
            vec![
                "--model".into(),
                ms.into(),
                "--prompt".into(),
                "hi".into(),
                "--temperature=-1".into(),
            ],
            "--temperature must be >= 0",
        ),
        (
            // a negative number as a separate value reaches the range check too
            vec![
                "--model".into(),
                ms.into(),
                "--prompt".into(),
                "hi".into(),
                "--temperature".into(),
                "-1".into(),
            ],
            "--temperature must be >= 0",
        ),
        (
            vec![
                "--model".into(),
                ms.into(),
                "--prompt".into(),
                "hi".into(),
                "--top-p".into(),
                "1.5".into(),
            ],
            "--top-p must be in (0, 1]",
        ),
        (
            vec![
                "--model".into(),
                ms.into(),
                "--prompt".into(),
                "hi".into(),
                "--repetition-penalty".into(),
                "0".into(),
            ],
            "--repetition-penalty must be > 0",
        ),
        (
            vec![
                "--model".into(),
                ms.into(),
                "--prompt".into(),
                "word ".repeat(9000),
            ],
            "exceeds the model's context of 8192 tokens",
        ),
        (
            vec!["--model".into(), ms.into()],
            "give one of --prompt TEXT, --chat or --input FILE",
        ),
    ];
    for (args, want) in cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = infer(&a, None);
        assert_ne!(code, 0, "{want}");
        assert!(err.contains(want), "want '{want}' in {err}");
    }
    // an adapter for a different base (wider layers)
    let ad = tmp.path().join("wide");
    let mut w = BTreeMap::new();
    w.insert(
        "model.layers.0.self_attn.q_proj".to_string(),
        (
            Tensor::zeros((2, 1024), DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros((1024, 2), DType::F32, &Device::Cpu).unwrap(),
        ),
    );
    Adapter::save(
        &LoraConfig::new(2, 4.0, 0.0, vec!["q_proj".into()]),
        &w,
        &ad,
    )
    .unwrap();
    let (code, _, err) = infer(
        &[
            "--model",
            ms,
            "--adapter",
            ad.to_str().unwrap(),
            "--prompt",
            "hi",
        ],
        None,
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("do not fit the base weight [576, 576]") && err.contains("different base"),
        "{err}"
    );
}

#[test]
fn a_reader_that_goes_away_ends_infer_quietly() {
    // `infer --input ... | head -c 20`: the first line is written, the reader leaves, the next
    // write fails; infer stops with status 0 and no error or panic on stderr
    let m = real_model_dir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"prompt\": \"Say hi.\"}\n{\"prompt\": \"Say bye.\"}\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_infer"))
        .args([
            "--model",
            m.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
        ])
        .args(["--max-new-tokens", "8"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 20];
    std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
    drop(stdout);
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(!err.contains("error") && !err.contains("panicked"), "{err}");
    assert!(String::from_utf8_lossy(&first).starts_with("{\"id\""));
}

#[test]
fn batches_name_failed_conversations_and_never_leave_partial_outputs() {
    let m = real_model_dir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    // line 2 is too long for the context; line 3 is not a conversation
    let long = "word ".repeat(9000);
    std::fs::write(
        &input,
        format!("{{\"id\": \"a\", \"prompt\": \"Say hi.\"}}\n{{\"id\": \"too-long\", \"prompt\": \"{long}\"}}\n{{\"foo\": 1}}\n{{\"id\": \"c\", \"prompt\": \"Say bye.\"}}\n"),
    )
    .unwrap();
    let out = tmp.path().join("out.jsonl");
    let run = |extra: &[&str]| {
        let mut a = vec![
            "--model",
            m.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
        ];
        a.extend(["--output", out.to_str().unwrap(), "--max-new-tokens", "8"]);
        a.extend(extra);
        infer(&a, None)
    };
    // the first failure ends the run, named, and nothing is left under the output's name
    let (code, _, err) = run(&[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("'too-long'") && err.contains("in.jsonl:2") && err.contains("context"),
        "{err}"
    );
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        1,
        "no temporary left"
    );
    // --max-bad 2: both are skipped and counted, the others answered
    let (code, _, err) = run(&["--max-bad", "2"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("in.jsonl:3") && err.contains("2 conversation(s) skipped"),
        "{err}"
    );
    let ids: Vec<String> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ids, ["a", "c"]);
    // an empty input is an error
    std::fs::write(&input, "\n").unwrap();
    let (code, _, err) = run(&[]);
    assert_eq!(code, 1);
    assert!(err.contains("empty input file"), "{err}");
}

#[test]
fn template_and_sampling_defaults_come_from_the_model_directory() {
    let real = real_model_dir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("model");
    std::fs::create_dir(&m).unwrap();
    for f in std::fs::read_dir(&real).unwrap() {
        let f = f.unwrap().path();
        std::os::unix::fs::symlink(&f, m.join(f.file_name().unwrap())).unwrap();
    }
    let ms = m.to_str().unwrap();
    // the model asks for sampling: chat and batch sample, --compare and flags can say greedy
    std::fs::remove_file(m.join("generation_config.json")).unwrap();
    std::fs::write(
        m.join("generation_config.json"),
        r#"{"eos_token_id": 2, "do_sample": true, "temperature": 0.7, "top_p": 0.9}"#,
    )
    .unwrap();
    let (code, _, err) = infer(
        &["--model", ms, "--prompt", "hi", "--max-new-tokens", "4"],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("decoding: sampling (temperature 0.7, top_p 0.9, top_k 50, seed 42)")
            && err.contains("from generation_config.json"),
        "{err}"
    );
    let (_, _, err) = infer(
        &[
            "--model",
            ms,
            "--prompt",
            "hi",
            "--max-new-tokens",
            "4",
            "--do-sample",
            "false",
        ],
        None,
    );
    assert!(
        err.contains("decoding: greedy") && err.contains("as asked"),
        "{err}"
    );
    // --template: the file's rendering is what the model gets (a longer system prompt here)
    let t = tmp.path().join("t.jinja");
    std::fs::write(
        &t,
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>system\nYou answer in one word.<|im_end|>\n<|im_start|>assistant\n{% endif %}",
    )
    .unwrap();
    let prompt_tokens = |extra: &[&str]| {
        let mut a = vec!["--model", ms, "--prompt", "hi", "--max-new-tokens", "2"];
        a.extend(extra);
        let (code, _, err) = infer(&a, None);
        assert_eq!(code, 0, "{err}");
        let n: usize = err
            .split(" prompt tokens")
            .next()
            .and_then(|s| s.rsplit(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{err}"));
        n
    };
    let (own, custom) = (
        prompt_tokens(&[]),
        prompt_tokens(&["--template", t.to_str().unwrap()]),
    );
    assert_ne!(own, custom);
    let (code, _, err) = infer(
        &[
            "--model",
            ms,
            "--prompt",
            "hi",
            "--template",
            "/nonexistent.jinja",
        ],
        None,
    );
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent.jinja"), "{err}");
}
