//! dataprep with the real SmolLM2 tokenizer and chat template.

use common::chat::{ChatTemplate, Message};
use common::data::labels::{LabelMode, Labeler, Sample, TruncationSide};
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

/// The samples of one conversation, labelled as dataprep does with the model's template.
fn samples(
    t: &ChatTemplate,
    tok: &tokenizer::Tokenizer,
    msgs: &[Message],
    mode: LabelMode,
) -> Vec<Sample> {
    Labeler {
        template: t,
        tok,
        eot: t.turn_end_text().unwrap(),
        mode,
        max_len: None,
        truncation: TruncationSide::Turns,
    }
    .conversation(msgs)
    .unwrap()
    .samples
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
    let s = &samples(&t, &tok, &msgs, LabelMode::All)[0];
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
    let all = samples(&t, &tok, &msgs, LabelMode::All);
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].label_tokens(), per_reply.iter().sum::<usize>());
    let last = samples(&t, &tok, &msgs, LabelMode::Last);
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].label_tokens(), per_reply[2]);
    assert_eq!(last[0].ids, all[0].ids);
    let exp = samples(&t, &tok, &msgs, LabelMode::Expand);
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
    // a run of a fraction of a second logs no progress lines ("dataprep: 2/20", ...)
    assert!(
        !err.contains("dataprep: 2/20") && err.lines().count() <= 1,
        "{err}"
    );
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

/// Label runs of a conversation's samples, decoded.
fn decoded_labels(tok: &tokenizer::Tokenizer, ss: &[Sample]) -> Vec<String> {
    ss.iter()
        .flat_map(label_runs)
        .map(|r| tokenizer::decode(tok, &r).unwrap())
        .collect()
}

#[test]
fn replies_ending_in_whitespace_keep_their_end_of_turn_label() {
    let dir = real_model_dir().unwrap();
    let tok = tokenizer::load(&dir).unwrap();
    let t = ChatTemplate::from_model_dir(&dir).unwrap();
    let msgs = vec![
        Message::new("user", "hi"),
        Message::new("assistant", "Sure thing.\n"),
        Message::new("user", "and?"),
        Message::new("assistant", "Done. "),
    ];
    // trained as given: the trailing whitespace, then <|im_end|>
    for mode in [LabelMode::All, LabelMode::Expand] {
        assert_eq!(
            decoded_labels(&tok, &samples(&t, &tok, &msgs, mode)),
            ["Sure thing.\n<|im_end|>", "Done. <|im_end|>"],
            "{mode:?}"
        );
    }
}

/// A model directory with SmolLM2's tokenizer and another chat template.
fn model_with_template(root: &Path, name: &str, template: &str) -> std::path::PathBuf {
    let real = real_model_dir().unwrap();
    let d = root.join(name);
    std::fs::create_dir_all(&d).unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(real.join(f), d.join(f)).unwrap();
    }
    std::fs::write(d.join("chat_template.jinja"), template).unwrap();
    d
}

#[test]
fn the_end_of_turn_token_is_what_the_template_writes() {
    let real = real_model_dir().unwrap();
    let tok = tokenizer::load(&real).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // Llama 3 style: turns end with their own token (here SmolLM2's <|endoftext|>, id 0), not eos
    let llama3 = "{% for m in messages %}<|im_start|>{{ m.role }}\n\n{{ m.content }}<|endoftext|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n\n{% endif %}";
    // DeepSeek style: plain-text roles, the eos token after each reply
    let deepseek = "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}User: {{ m.content }}\n\n{% elif m.role == 'assistant' %}Assistant: {{ m.content }}{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}";
    // Mistral style: </s> after each reply, which this vocabulary does not have as one token
    let mistral = "{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]{% else %}{{ m.content }}</s>{% endif %}{% endfor %}";
    let msgs = three_turns()[1..5].to_vec();
    for (name, src, eot, ids) in [
        ("llama3", llama3, "<|endoftext|>", vec![0u32]),
        ("deepseek", deepseek, "<|im_end|>", vec![2]),
    ] {
        let m = model_with_template(tmp.path(), name, src);
        let t = ChatTemplate::from_model_dir(&m).unwrap();
        let e = t.end_of_turn(&tok).unwrap();
        assert_eq!((e.text.as_str(), &e.ids), (eot, &ids), "{name}");
        assert!(e.problem().is_none());
        let runs = decoded_labels(&tok, &samples(&t, &tok, &msgs, LabelMode::All));
        assert_eq!(runs.len(), 2, "{name}: {runs:?}");
        for (run, reply) in runs.iter().zip(REPLIES) {
            assert!(run.ends_with(&format!("{reply}{eot}")), "{name}: {run:?}");
        }
        // infer stops on the same token
        let stops = common::generate::stop_ids(&m, &e);
        assert!(stops.contains(&ids[0]), "{name}: {stops:?}");
    }
    // a marker that is not one token: dataprep says so, and still labels it
    let m = model_with_template(tmp.path(), "mistral", mistral);
    let input = write(tmp.path(), "c.jsonl", &format!("{}\n", GOOD));
    let out = tmp.path().join("shards");
    let (code, err) = dataprep(&[
        input.to_str().unwrap(),
        "--model",
        m.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("\"</s>\"") && err.contains("not one"), "{err}");
    let meta = Meta::load(&out).unwrap();
    assert_eq!(meta.end_of_turn, "</s>");
    assert!(meta.end_of_turn_ids.len() > 1);
}

#[test]
fn truncation_keeps_the_labelled_turn_and_counts_what_was_cut() {
    let dir = real_model_dir().unwrap();
    let tok = tokenizer::load(&dir).unwrap();
    let t = ChatTemplate::from_model_dir(&dir).unwrap();
    let msgs = three_turns();
    let full = samples(&t, &tok, &msgs, LabelMode::Last)[0].ids.len();
    let last = samples(
        &t,
        &tok,
        &msgs[..1]
            .iter()
            .chain(&msgs[5..])
            .cloned()
            .collect::<Vec<_>>(),
        LabelMode::Last,
    )[0]
    .clone();
    let label = |side, max| {
        Labeler {
            template: &t,
            tok: &tok,
            eot: "<|im_end|>".into(),
            mode: LabelMode::Last,
            max_len: Some(max),
            truncation: side,
        }
        .conversation(&msgs)
        .unwrap()
    };
    let reply = format!("{}<|im_end|>", REPLIES[2]);
    // turns: the two oldest exchanges go, the system message and the last exchange stay whole
    let p = label(TruncationSide::Turns, last.ids.len() + 3);
    assert_eq!(p.samples[0], last);
    assert_eq!((p.truncated, p.turns_dropped, p.tokens_cut), (1, 2, 0));
    assert_eq!(
        decoded_labels(&tok, &p.samples),
        std::slice::from_ref(&reply)
    );
    // left: the start goes, the labelled end stays
    let p = label(TruncationSide::Left, 40);
    assert_eq!((p.samples[0].ids.len(), p.tokens_cut), (40, full - 40));
    assert_eq!(decoded_labels(&tok, &p.samples), [reply]);
    // right (HF's default): the labelled reply at the end is what goes
    let p = label(TruncationSide::Right, 40);
    assert_eq!(p.samples[0].label_tokens(), 0);
    // through the binary: counts in meta.json, the length histogram before truncation
    let tmp = tempfile::tempdir().unwrap();
    let rec = serde_json::json!({"messages": msgs.iter().map(|m| serde_json::json!({"role": m.role, "content": m.content})).collect::<Vec<_>>()});
    let input = write(tmp.path(), "c.jsonl", &format!("{rec}\n{rec}\n"));
    let out = tmp.path().join("shards");
    let max = (last.ids.len() + 3).to_string();
    let (code, err) = dataprep(&[
        input.to_str().unwrap(),
        "--model",
        dir.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--label-mode",
        "expand",
        "--max-seq-len",
        &max,
    ]);
    assert_eq!(code, 0, "{err}");
    let meta = Meta::load(&out).unwrap();
    // per conversation: turn 2 drops 1 exchange, turn 3 drops 2
    assert_eq!(
        (meta.truncated, meta.turns_dropped, meta.tokens_cut),
        (4, 6, 0)
    );
    // every labelled reply survives whole, with its end-of-turn token
    let per_conversation: usize = REPLIES
        .iter()
        .map(|r| {
            tokenizer::encode(&tok, &format!("{r}<|im_end|>"))
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(meta.train.label_tokens, 2 * per_conversation);
    assert_eq!(meta.length_histogram.counts.iter().sum::<usize>(), 6);
}

#[test]
fn empty_replies_encodings_and_empty_files() {
    let dir = real_model_dir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, bytes: &[u8], extra: &[&str]| {
        let input = tmp.path().join(name);
        std::fs::write(&input, bytes).unwrap();
        let out = tmp.path().join(format!("{name}.out"));
        let mut a = vec![
            input.to_str().unwrap().to_string(),
            "--model".into(),
            dir.to_str().unwrap().into(),
            "-o".into(),
            out.to_str().unwrap().into(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let (code, err) = dataprep(&a);
        (code, err, out)
    };
    // a byte-order mark before JSONL is accepted
    let (code, err, _) = run(
        "bom.jsonl",
        format!("\u{feff}{GOOD}\n{GOOD}\n").as_bytes(),
        &[],
    );
    assert_eq!(code, 0, "{err}");
    // an invalid UTF-8 line is a bad record with its line number; --max-bad lets it pass
    let mut latin1 = format!("{GOOD}\n").into_bytes();
    latin1.extend(b"{\"conversation\":[{\"input\":\"caf\xe9\",\"output\":\"ok\"}]}\n");
    let (code, err, out) = run("latin1.jsonl", &latin1, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("latin1.jsonl:2") && err.contains("invalid UTF-8"),
        "{err}"
    );
    assert!(!out.exists());
    let (code, err, _) = run("latin1.jsonl", &latin1, &["--max-bad", "1"]);
    assert_eq!(code, 0, "{err}");
    // an empty or blank file says so
    let (code, err, _) = run("empty.jsonl", b"\n  \n", &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("empty.jsonl") && err.contains("empty input file"),
        "{err}"
    );
    // empty replies are counted and named
    let empty = r#"{"conversation":[{"input":"hello","output":""},{"input":"still there?","output":"Yes."}]}"#;
    let (code, err, out) = run("e.jsonl", format!("{empty}\n{GOOD}\n").as_bytes(), &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("e.jsonl:1") && err.contains("1 empty assistant reply"),
        "{err}"
    );
    assert_eq!(Meta::load(&out).unwrap().empty_replies, 1);
    // a whitespace-only reply: trained as that whitespace and the end of turn, and the
    // warning says exactly that (it said "an immediate end of turn")
    let blank = r#"{"conversation":[{"input":"hello","output":"\n\t "}]}"#;
    let (code, err, out) = run(
        "w.jsonl",
        format!("{blank}\n").as_bytes(),
        &["--val-split", "0"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("w.jsonl:1")
            && err.contains("1 assistant reply of whitespace only")
            && err.contains("whitespace tokens are trained before the end of turn"),
        "{err}"
    );
    let meta = Meta::load(&out).unwrap();
    assert_eq!((meta.empty_replies, meta.blank_replies), (0, 1));
    let shard = ShardReader::open(&out, &meta, "train").unwrap();
    let (toks, mask) = shard.get(0);
    let labelled: Vec<u32> = toks
        .iter()
        .zip(mask)
        .filter(|(_, &m)| m != 0)
        .map(|(&t, _)| t)
        .collect();
    let tok = tokenizer::load(&dir).unwrap();
    // what the labels hold: whitespace, then the end-of-turn token
    let text = tokenizer::decode(&tok, &labelled).unwrap();
    let ws = text
        .strip_suffix("<|im_end|>")
        .unwrap_or_else(|| panic!("{text:?}"));
    assert!(!ws.is_empty() && ws.trim().is_empty(), "{text:?}");
}

/// A key given twice in one object is a bad record naming the key (serde_json would keep the
/// last value and the record would lose data silently), in JSONL and in JSON arrays.
#[test]
fn duplicate_keys_are_bad_records_naming_the_key() {
    let dir = real_model_dir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let twice_output = r#"{"conversation":[{"input":"hello","output":"Hi.","output":"Bye."}]}"#;
    let twice_conv = r#"{"conversation":[{"input":"a","output":"b"}],"conversation":[{"input":"c","output":"d"}]}"#;
    for (name, text, key, at) in [
        (
            "o.jsonl",
            format!("{GOOD}\n{twice_output}\n"),
            "output",
            "o.jsonl:2",
        ),
        (
            "c.json",
            format!("[{GOOD}, {twice_conv}]"),
            "conversation",
            "c.json: record 1",
        ),
    ] {
        let input = tmp.path().join(name);
        std::fs::write(&input, text).unwrap();
        let out = tmp.path().join(format!("{name}.out"));
        let args = [
            input.to_str().unwrap(),
            "--model",
            dir.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ];
        let (code, err) = dataprep(&args);
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains(at)
                && err.contains(&format!("field '{key}'"))
                && err.contains("appears twice"),
            "{err}"
        );
        assert!(!out.exists());
        // counted as a bad record: --max-bad 1 lets the rest through
        let mut more = args.to_vec();
        more.extend(["--max-bad", "1"]);
        let (code, err) = dataprep(&more);
        assert_eq!(code, 0, "{err}");
        assert_eq!(Meta::load(&out).unwrap().bad_records, 1);
    }
}

/// Parquet as pyarrow (and so `datasets`) writes it (fixtures by
/// scripts/make-parquet-fixtures.py): each record format gives the same shards, byte for byte,
/// as the same records in JSONL; a bad row is named by file, row and field; globs expand;
/// a file that is not Parquet says so.
#[test]
fn parquet_rows_give_the_shards_of_the_same_jsonl() {
    let dir = real_model_dir().unwrap();
    let fixtures = common::testing::repo_root().join("dataprep/tests/fixtures/parquet");
    let tmp = tempfile::tempdir().unwrap();
    let prep = |inputs: &[&Path], out: &Path| {
        let mut a: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
        a.extend(
            [
                "--model",
                dir.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--val-split",
                "0.1",
            ]
            .map(String::from),
        );
        dataprep(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    for name in ["emollm", "sharegpt", "openai", "alpaca"] {
        let (j, p) = (
            tmp.path().join(format!("{name}.j")),
            tmp.path().join(format!("{name}.p")),
        );
        let (code, err) = prep(&[&fixtures.join(format!("{name}.jsonl"))], &j);
        assert_eq!(code, 0, "{err}");
        let (code, err) = prep(&[&fixtures.join(format!("{name}.parquet"))], &p);
        assert_eq!(code, 0, "{err}");
        let mut files: Vec<_> = std::fs::read_dir(&j)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        files.sort();
        assert!(files.len() >= 6, "{files:?}");
        for f in &files {
            if f == "meta.json" {
                continue;
            }
            assert!(
                std::fs::read(j.join(f)).unwrap() == std::fs::read(p.join(f)).unwrap(),
                "{name}: {f:?} differs"
            );
        }
        let (mj, mp) = (Meta::load(&j).unwrap(), Meta::load(&p).unwrap());
        assert_eq!(
            (mj.conversations, mj.train.sequences, mj.val.sequences),
            (mp.conversations, mp.train.sequences, mp.val.sequences)
        );
        assert_eq!(mj.conversations, 40);
    }
    // a bad row: file, row and field
    let (code, err) = prep(&[&fixtures.join("bad.parquet")], &tmp.path().join("bad"));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("bad.parquet: record 2: field 'output'"),
        "{err}"
    );
    // several files by a glob (as HF's data_files), and a pattern that matches nothing
    let pattern = fixtures.join("[eo]*.parquet");
    let out = tmp.path().join("glob");
    let (code, err) = prep(&[&pattern], &out);
    assert_eq!(code, 0, "{err}");
    let meta = Meta::load(&out).unwrap();
    assert_eq!(meta.conversations, 80);
    assert_eq!(meta.inputs.len(), 2, "{:?}", meta.inputs);
    let (code, err) = prep(
        &[&fixtures.join("nothing*.parquet")],
        &tmp.path().join("none"),
    );
    assert_eq!(code, 1);
    assert!(err.contains("no file matches"), "{err}");
    // not Parquet
    let fake = tmp.path().join("fake.parquet");
    std::fs::write(&fake, "{\"instruction\": \"hi\"}\n").unwrap();
    let (code, err) = prep(&[&fake], &tmp.path().join("fake"));
    assert_eq!(code, 1);
    assert!(
        err.contains("fake.parquet: cannot read as Parquet"),
        "{err}"
    );
}
