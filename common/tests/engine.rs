//! The batched engine on the real SmolLM2 with two adapters: a request's answer is the one it
//! gets alone, token for token, whatever shares the batch (base and adapters mixed, prompts of
//! different lengths joining at different steps, greedy and seeded sampling) and whatever the
//! prefix cache gives it (prompts seen before, a conversation's next turn); and the weights
//! quantized to q8_0 or q4_k give the f32 greedy answer wherever the f32 model's choice is clear.

use common::chat::Message;
use common::engine::{EngineOptions, Event, Request, Tagged};
use common::generate::SamplingParams;
use common::infer::{ModelOptions, Session};
use common::model::WeightFormat;
use common::testing::{real_model_dir, reference};
use std::collections::BTreeMap;

/// The oracle's prompts and the held-out conversations (first turn, and two turns with a
/// written first answer).
fn prompts() -> Vec<Vec<Message>> {
    let r = reference().unwrap();
    let msgs = |v: &serde_json::Value| -> Vec<Message> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect()
    };
    let mut out = vec![
        msgs(&r["chat_prompt"]["messages"]),
        msgs(&r["multi_turn_prompt"]["messages"]),
    ];
    let held =
        std::fs::read_to_string(common::testing::repo_root().join("data/counsel_heldout.jsonl"))
            .unwrap();
    for (i, line) in held.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let turns = v["conversation"].as_array().unwrap();
        let mut h = vec![Message::new("system", turns[0]["system"].as_str().unwrap())];
        h.push(Message::new("user", turns[0]["input"].as_str().unwrap()));
        if i % 2 == 1 && turns.len() > 1 {
            h.push(Message::new(
                "assistant",
                "I hear you. Tell me more about what worries you most.",
            ));
            h.push(Message::new("user", turns[1]["input"].as_str().unwrap()));
        }
        out.push(h);
    }
    out
}

fn greedy(max: usize) -> SamplingParams {
    SamplingParams {
        max_new_tokens: max,
        ..Default::default()
    }
}

#[test]
fn answers_do_not_depend_on_what_shares_the_batch() {
    let Ok(model) = real_model_dir() else {
        eprintln!("skipped: the real model is not imported (make model)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (a1, a2) = (tmp.path().join("a1"), tmp.path().join("a2"));
    common::testing::random_adapter(&a1, 1).unwrap();
    common::testing::random_adapter(&a2, 2).unwrap();
    let options = |prefix_cache_bytes| ModelOptions {
        // small chunks: every prompt takes several steps, beside others' decoding
        engine: EngineOptions {
            max_batch: 8,
            max_queue: 64,
            prefill_chunk: 24,
            prefix_cache_bytes,
        },
        ..Default::default()
    };
    let adapters = vec![("a1".to_string(), a1), ("a2".to_string(), a2)];
    // alone and without a prefix cache; mixed with one (each prompt is asked several times, and
    // every held-out one starts with the same system prompt)
    let s = Session::open(&model, &adapters, None, None, &options(0), greedy(20)).unwrap();
    let c = Session::open(
        &model,
        &adapters,
        None,
        None,
        &options(64 << 20),
        greedy(20),
    )
    .unwrap();
    let mut jobs = Vec::new();
    for (i, p) in prompts().iter().enumerate() {
        let ids = s.prompt_ids(p).unwrap();
        for a in [None, Some("a1"), Some("a2")] {
            jobs.push(Request::new(ids.clone(), a.map(str::to_string), greedy(20)));
            if i < 3 {
                // seeded sampling with a penalty: the request's own sampler
                let mut r = Request::new(
                    ids.clone(),
                    a.map(str::to_string),
                    SamplingParams {
                        temperature: 0.9,
                        top_k: Some(40),
                        seed: 7 + i as u64,
                        ..greedy(20)
                    },
                );
                r.frequency_penalty = 0.5;
                jobs.push(r);
            }
        }
    }
    let alone: Vec<Vec<u32>> = jobs
        .iter()
        .map(|r| s.engine.generate(r.clone(), |_| {}).unwrap().ids)
        .collect();
    // the adapters are in effect
    let answers = |a: Option<&str>| -> Vec<&Vec<u32>> {
        jobs.iter()
            .zip(&alone)
            .filter(|(r, _)| r.adapter.as_deref() == a && r.params.temperature == 0.0)
            .map(|(_, ids)| ids)
            .collect()
    };
    assert_ne!(
        answers(None),
        answers(Some("a1")),
        "base and a1 answer alike"
    );
    assert_ne!(
        answers(Some("a1")),
        answers(Some("a2")),
        "a1 and a2 answer alike"
    );
    // mixed: a third at once, the next third once a few tokens have been streamed, and so on
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut mixed = BTreeMap::new();
    let mut cached = 0;
    let third = jobs.len().div_ceil(3);
    let mut submitted = 0;
    let mut deltas = 0;
    while mixed.len() < jobs.len() {
        if submitted < jobs.len() && (submitted == 0 || deltas >= 5) {
            let end = (submitted + third).min(jobs.len());
            for (k, job) in jobs.iter().enumerate().take(end).skip(submitted) {
                c.engine
                    .submit(job.clone(), Box::new(Tagged(k, tx.clone())))
                    .unwrap();
            }
            submitted = (submitted + third).min(jobs.len());
            deltas = 0;
        }
        match rx.blocking_recv().unwrap() {
            (_, Event::Delta { .. }) => deltas += 1,
            (k, Event::Done(f)) => {
                cached += f.cached_tokens;
                mixed.insert(k, f.ids);
            }
            (k, Event::Error(e)) => panic!("job {k}: {e}"),
        }
    }
    for (k, want) in alone.iter().enumerate() {
        assert_eq!(&mixed[&k], want, "job {k} (adapter {:?})", jobs[k].adapter);
    }
    assert!(cached > 0, "the prefix cache served no prompt token");
    // the next turn of a conversation reuses the first turn's prompt and its generated answer
    let first = &prompts()[0];
    let ids = c.prompt_ids(first).unwrap();
    let answer = c
        .engine
        .generate(Request::new(ids.clone(), None, greedy(20)), |_| {})
        .unwrap();
    let mut next = first.clone();
    next.push(Message::new("assistant", &answer.text));
    next.push(Message::new("user", "Thank you. What should I try first?"));
    let next_ids = c.prompt_ids(&next).unwrap();
    let with = c
        .engine
        .generate(Request::new(next_ids.clone(), None, greedy(20)), |_| {})
        .unwrap();
    let without = s
        .engine
        .generate(Request::new(next_ids, None, greedy(20)), |_| {})
        .unwrap();
    assert_eq!(
        with.ids, without.ids,
        "the next turn with and without the prefix cache"
    );
    assert!(
        with.cached_tokens > ids.len(),
        "the next turn reused {} positions; its first turn's prompt has {}",
        with.cached_tokens,
        ids.len()
    );
    eprintln!(
        "{} requests: each answered in a mixed batch, with the prefix cache ({cached} prompt tokens reused), as alone; the next turn reused {} of {} positions",
        jobs.len(),
        with.cached_tokens,
        with.prompt_tokens
    );
}

/// A lighter format against f32 on the f32 model's greedy answers (teacher-forced): at every
/// answer position where f32's top two logits are at least `margin` apart, the format picks
/// f32's token; the top-1 agreement over all positions is printed. The weights take at most
/// `share` of f32's.
fn agrees_with_f32_where_the_choice_is_clear(format: WeightFormat, margin: f32, share: f64) {
    use candle_core::{DType, Device, Tensor};
    let Ok(model) = real_model_dir() else {
        eprintln!("skipped: the real model is not imported (make model)");
        return;
    };
    let f32s = Session::open(
        &model,
        &[],
        None,
        None,
        &ModelOptions::default(),
        greedy(32),
    )
    .unwrap();
    let dense = common::Llama::from_dir(&model, DType::F32, &Device::Cpu).unwrap();
    let mut light = common::Llama::from_dir(&model, DType::F32, &Device::Cpu).unwrap();
    light.pack(format).unwrap();
    // the projections and the head lighter; the embedding stays f32
    assert!(
        (light.weight_bytes() as f64) < share * dense.weight_bytes() as f64,
        "{format}: {} vs {}",
        light.weight_bytes(),
        dense.weight_bytes()
    );
    let (mut agree, mut total, mut clear) = (0, 0, 0);
    // the largest f32 margin at which the format picks another token
    let mut widest = 0f32;
    for p in prompts() {
        let prompt = f32s.prompt_ids(&p).unwrap();
        let answer = f32s
            .engine
            .generate(Request::new(prompt.clone(), None, greedy(32)), |_| {})
            .unwrap()
            .ids;
        let mut seq = prompt.clone();
        seq.extend(&answer[..answer.len() - 1]);
        let ids = Tensor::new(seq.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let rows = |m: &common::Llama| -> Vec<Vec<f32>> {
            let l = m.forward(&ids, None).unwrap().squeeze(0).unwrap();
            (prompt.len() - 1..seq.len())
                .map(|i| l.get(i).unwrap().to_vec1().unwrap())
                .collect()
        };
        let (lf, lq) = (rows(&dense), rows(&light));
        let top2 = |v: &[f32]| {
            let mut o: Vec<usize> = (0..v.len()).collect();
            o.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
            (o[0], v[o[0]] - v[o[1]])
        };
        for (f, q) in lf.iter().zip(&lq) {
            let ((tf, m), (tq, _)) = (top2(f), top2(q));
            total += 1;
            agree += usize::from(tf == tq);
            if tf != tq {
                widest = widest.max(m);
            }
            if m >= margin {
                clear += 1;
                assert_eq!(
                    tq, tf,
                    "{format} differs from f32 where f32's margin is {m} (at least {margin})"
                );
            }
        }
    }
    eprintln!("{format} vs f32, top-1 on f32's greedy answers: {agree}/{total} positions agree; all {clear} with a top-2 margin >= {margin} agree; the widest margin where they differ: {widest}");
    // not a vacuous check: two positions in five or more have a clear choice
    assert!(
        clear * 5 > total * 2,
        "only {clear} of {total} positions have a clear choice"
    );
}

#[test]
fn q8_0_gives_the_f32_answer_where_the_choice_is_clear() {
    agrees_with_f32_where_the_choice_is_clear(WeightFormat::Q8_0, 1.0, 0.5);
}

/// q4_k: Q4_K_M's types, for this model's 576-wide rows mostly q5_0 (the products of `q8.rs`),
/// q4_k / q6_k for the down projections (candle's `vec_dot`, `kquant.rs`), the head in q8_0.
/// Lossier than q8_0 (fewer positions agree, and at wider margins: q8_0 has differed from f32
/// at most at 0.22, q4_k at up to 1.04 as the f32 kernels' rounding changed), but where f32's
/// choice is clear, 1.5 or more, it makes the same one.
#[test]
fn q4_k_gives_the_f32_answer_where_the_choice_is_clear() {
    agrees_with_f32_where_the_choice_is_clear(WeightFormat::Q4K, 1.5, 0.45);
}
