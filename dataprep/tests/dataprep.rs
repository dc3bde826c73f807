//! dataprep with the real SmolLM2 tokenizer and chat template.

use common::chat::{ChatTemplate, Message};
use common::data::labels::{conversation_samples, LabelMode, Sample};
use common::data::shards::{check_tokenizer, Meta, ShardReader};
use common::testing::real_model_dir;
use common::tokenizer;
use std::path::Path;
use std::process::Command;

const REPLIES: [&str; 3] = [
    "That sounds really hard. What has been weighing on you most?",
    "Thank you for telling me. Sleep problems often follow worry; how long has this gone on?",
    "Two weeks is long enough to take seriously. Would a short wind-down routine help tonight?",
];

fn three_turns() -> Vec<Message> {
    vec![
        Message::new("system", "You are a supportive counsellor."),
        Message::new("user", "I have been feeling low lately."),
        Message::new("assistant", REPLIES[0]),
        Message::new("user", "Mostly I can't sleep."),
        Message::new("assistant", REPLIES[1]),
        Message::new("user", "About two weeks."),
        Message::new("assistant", REPLIES[2]),
    ]
}

/// Contiguous runs of label tokens.
fn label_runs(s: &Sample) -> Vec<Vec<u32>> {
    let mut runs = Vec::new();
    let mut cur = Vec::new();
    for (id, m) in s.ids.iter().zip(&s.mask) {
        if *m == 1 {
            cur.push(*id);
        } else if !cur.is_empty() {
            runs.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        runs.push(cur);
    }
    runs
}

#[test]
fn labels_are_exactly_the_replies_and_prompts_match_inference() {
    let dir = real_model_dir().unwrap();
    let tok = tokenizer::load(&dir).unwrap();
    let t = ChatTemplate::from_model_dir(&dir).unwrap();
    let msgs = three_turns();
    let s = &conversation_samples(&t, &tok, &msgs, LabelMode::All, "<|im_end|>").unwrap()[0];
    let runs = label_runs(s);
    assert_eq!(runs.len(), 3);
    for (run, reply) in runs.iter().zip(REPLIES) {
        assert_eq!(
            tokenizer::decode(&tok, run).unwrap(),
            format!("{reply}<|im_end|>")
        );
    }
    // the tokens before each reply are exactly what infer feeds for that history
    let mut start = 0;
    for (k, i) in [2usize, 4, 6].iter().enumerate() {
        let pos = s
            .mask
            .iter()
            .enumerate()
            .skip(start)
            .find(|(_, &m)| m == 1)
            .unwrap()
            .0;
        let prompt = tokenizer::encode(&tok, &t.render(&msgs[..*i], true).unwrap()).unwrap();
        assert_eq!(&s.ids[..pos], &prompt[..], "turn {k}");
        start = pos + runs[k].len();
    }
    // and the whole sample is the rendered conversation tokenized once (no extra BOS)
    assert_eq!(
        s.ids,
        tokenizer::encode(&tok, &t.render(&msgs, false).unwrap()).unwrap()
    );
    assert_eq!(
        s.ids.iter().filter(|&&i| i == 1).count(),
        msgs.len(),
        "one <|im_start|> per message, no added BOS"
    );
    assert_eq!(s.ids[0], 1);
}

#[test]
fn three_label_modes_count_the_expected_tokens() {
    let dir = real_model_dir().unwrap();
    let tok = tokenizer::load(&dir).unwrap();
    let t = ChatTemplate::from_model_dir(&dir).unwrap();
    let msgs = three_turns();
    let per_reply: Vec<usize> = REPLIES
        .iter()
        .map(|r| {
            tokenizer::encode(&tok, &format!("{r}<|im_end|>"))
                .unwrap()
                .len()
        })
        .collect();
    let all = conversation_samples(&t, &tok, &msgs, LabelMode::All, "<|im_end|>").unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].label_tokens(), per_reply.iter().sum::<usize>());
    let last = conversation_samples(&t, &tok, &msgs, LabelMode::Last, "<|im_end|>").unwrap();
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].label_tokens(), per_reply[2]);
    assert_eq!(last[0].ids, all[0].ids);
    let exp = conversation_samples(&t, &tok, &msgs, LabelMode::Expand, "<|im_end|>").unwrap();
    assert_eq!(exp.len(), 3);
    for (k, s) in exp.iter().enumerate() {
        assert_eq!(s.label_tokens(), per_reply[k], "expand sample {k}");
        assert_eq!(
            *s.mask.last().unwrap(),
            0,
            "the newline after <|im_end|> is not a label"
        );
    }
    assert!(exp[0].ids.len() < exp[1].ids.len() && exp[1].ids.len() < exp[2].ids.len());
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn dataprep(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dataprep"))
        .args(args)
        .env("DIALORA_NO_BAR", "1")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

const GOOD: &str =
    r#"{"conversation":[{"input":"hello","output":"Hi, how are you feeling today?"}]}"#;

#[test]
fn each_bad_input_kind_is_reported_and_nothing_is_written() {
    let dir = real_model_dir().unwrap();
    let model = dir.to_str().unwrap();
    let cases = [
        ("not json at all", "a.jsonl:2: invalid JSON"),
        (
            r#"{"conversation":[{"output":"x"}]}"#,
            "a.jsonl:2: field 'conversation[0].input': missing",
        ),
        (
            r#"{"messages":[]}"#,
            "a.jsonl:2: field 'messages': empty conversation",
        ),
        (
            r#"{"messages":[{"role":"user","content":["x"]}]}"#,
            "a.jsonl:2: field 'messages[0].content': must be a string, got a list",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}]}"#,
            "a.jsonl:2: field 'messages[0]': conversation ends on a user turn",
        ),
        (
            r#"{"conversations":[{"from":"alien","value":"x"}]}"#,
            "a.jsonl:2: field 'conversations[0].from': unknown role 'alien'",
        ),
    ];
    for (bad, want) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let input = write(tmp.path(), "a.jsonl", &format!("{GOOD}\n{bad}\n"));
        let out = tmp.path().join("out");
        let (code, err) = dataprep(&[
            input.to_str().unwrap(),
            "--model",
            model,
            "-o",
            out.to_str().unwrap(),
        ]);
        assert_ne!(code, 0, "{bad}");
        assert!(err.contains(want), "want '{want}' in:\n{err}");
        assert!(err.contains("nothing written"), "{err}");
        assert!(!out.exists(), "output written for {bad}");
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "temp files left: {leftovers:?}");
        // --strict stops at the first, with the same message
        let (code, err) = dataprep(&[
            input.to_str().unwrap(),
            "--model",
            model,
            "-o",
            out.to_str().unwrap(),
            "--strict",
        ]);
        assert_ne!(code, 0);
        assert!(err.contains(want), "{err}");
        assert!(!out.exists());
        // tolerated with --max-bad: the good record is kept and the bad one counted
        let (code, err) = dataprep(&[
            input.to_str().unwrap(),
            "--model",
            model,
            "-o",
            out.to_str().unwrap(),
            "--max-bad",
            "1",
        ]);
        assert_eq!(code, 0, "{err}");
        let meta = Meta::load(&out).unwrap();
        assert_eq!((meta.bad_records, meta.train.sequences), (1, 1));
    }
}

#[test]
fn existing_output_is_not_overwritten_and_json_arrays_name_records() {
    let dir = real_model_dir().unwrap();
    let model = dir.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let input = write(
        tmp.path(),
        "a.json",
        &format!("[{GOOD}, {{\"messages\": 3}}]"),
    );
    let out = tmp.path().join("out");
    let (code, err) = dataprep(&[
        input.to_str().unwrap(),
        "--model",
        model,
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("a.json: record 1: field 'messages': must be a list"),
        "{err}"
    );
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "precious").unwrap();
    let (code, err) = dataprep(&[
        input.to_str().unwrap(),
        "--model",
        model,
        "-o",
        out.to_str().unwrap(),
        "--max-bad",
        "1",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("not empty") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "precious"
    );
    let (code, err) = dataprep(&[
        input.to_str().unwrap(),
        "--model",
        model,
        "-o",
        tmp.path().to_str().unwrap(),
        "--overwrite",
    ]);
    assert_ne!(
        code, 0,
        "writing over the input's directory must be refused"
    );
    assert!(err.contains("must not contain the input"), "{err}");
    assert!(input.exists());
}

#[test]
fn shards_round_trip_and_foreign_tokenizer_is_refused() {
    let dir = real_model_dir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut lines = String::new();
    for i in 0..20 {
        lines += &format!(
            "{{\"messages\":[{{\"role\":\"user\",\"content\":\"question {i}\"}},{{\"role\":\"assistant\",\"content\":\"answer number {i}\"}},{{\"role\":\"user\",\"content\":\"more\"}},{{\"role\":\"assistant\",\"content\":\"{}\"}}]}}\n",
            "x".repeat(i * 3)
        );
    }
    let input = write(tmp.path(), "d.jsonl", &lines);
    let out = tmp.path().join("shards");
    let (code, err) = dataprep(&[
        input.to_str().unwrap(),
        "--model",
        dir.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--val-split",
        "0.2",
        "--shard-size",
        "3",
        "--label-mode",
        "expand",
        "--max-seq-len",
        "48",
    ]);
    assert_eq!(code, 0, "{err}");
    let meta = Meta::load(&out).unwrap();
    assert_eq!(meta.conversations, 20);
    assert_eq!(
        meta.train.sequences + meta.val.sequences + meta.dropped_no_labels,
        40
    );
    // 4 conversations (x 2 turns) held out, minus turns truncated away
    assert!(
        meta.val.sequences > 0 && meta.val.sequences <= 8,
        "{}",
        meta.val.sequences
    );
    assert!(meta.train.shards.len() > 1);
    assert!(meta.truncated > 0);
    let tok = tokenizer::load(&dir).unwrap();
    let reader = ShardReader::open(&out, &meta, "train").unwrap();
    assert_eq!(reader.len(), meta.train.sequences);
    let mut labels = 0;
    for i in 0..reader.len() {
        let (ids, mask) = reader.get(i);
        assert!(ids.len() <= 48 && ids.len() == mask.len());
        labels += mask.iter().filter(|&&m| m == 1).count();
        // every sequence is a rendered conversation prefix, as written
        let text = tokenizer::decode(&tok, ids).unwrap();
        assert!(text.starts_with("<|im_start|>system\n"), "{text}");
    }
    assert_eq!(labels, meta.train.label_tokens);
    let fp = tokenizer::fingerprint(&tok).unwrap();
    check_tokenizer(&meta, &out, &fp, &dir).unwrap();
    let e = check_tokenizer(&meta, &out, "sha256:other", &dir)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("another tokenizer") && e.contains("meta.json"),
        "{e}"
    );
    // a truncated shard file is detected
    let f = out.join(format!("{}.tokens.u32", meta.train.shards[0].name));
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 4]).unwrap();
    let e = ShardReader::open(&out, &meta, "train")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("do not match meta.json"), "{e}");
}
