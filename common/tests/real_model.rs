//! The real SmolLM2-135M-Instruct, imported from GGUF, against HF transformers' outputs.

use candle_core::{DType, Device, IndexOp, Tensor};
use common::chat::{ChatTemplate, Message};
use common::generate::{generate, stop_ids, SamplingParams};
use common::testing::{ids, max_abs_diff, real_model_dir, reference};
use common::{tokenizer, Llama};

#[test]
fn tokenizer_reproduces_every_reference_id_list() {
    let dir = real_model_dir().unwrap();
    let r = reference().unwrap();
    let tok = tokenizer::load(&dir).unwrap();
    let texts = r["texts"].as_object().unwrap();
    assert!(texts.len() >= 5);
    for (name, e) in texts {
        let text = e["text"].as_str().unwrap();
        let got = tokenizer::encode(&tok, text).unwrap();
        assert_eq!(got, ids(&e["ids"]), "{name}: ids differ");
        // no BOS is added by the tokenizer: ids with special tokens are the same
        assert_eq!(got, ids(&e["ids_add_special_tokens"]), "{name}");
        assert_eq!(
            tokenizer::decode(&tok, &got).unwrap(),
            text,
            "{name}: decode round trip"
        );
    }
    // the chat prompt: same rendered text and same ids as apply_chat_template
    let tmpl = ChatTemplate::from_model_dir(&dir).unwrap();
    let text = tmpl
        .render(
            &[Message::new("user", "What is the capital of France?")],
            true,
        )
        .unwrap();
    assert_eq!(text, r["chat_prompt"]["text"].as_str().unwrap());
    assert_eq!(
        tokenizer::encode(&tok, &text).unwrap(),
        ids(&r["chat_prompt"]["ids"])
    );
    assert_eq!(
        tokenizer::encode(&tok, "<|im_start|>").unwrap(),
        vec![r["special_ids"]["bos"].as_u64().unwrap() as u32]
    );
}

#[test]
fn logits_and_greedy_decoding_match_hf() {
    let dir = real_model_dir().unwrap();
    let r = reference().unwrap();
    let model = Llama::from_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    let prompt = ids(&r["chat_prompt"]["ids"]);
    let x = Tensor::new(prompt.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.forward(&x, None).unwrap(); // [1, T, V]
    let last: Vec<f32> = logits.i((0, prompt.len() - 1)).unwrap().to_vec1().unwrap();
    let mut order: Vec<usize> = (0..last.len()).collect();
    order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
    let top = &r["prompt_last_logits_top10"];
    let want_ids = ids(&top["ids"]);
    let got_ids: Vec<u32> = order[..10].iter().map(|&i| i as u32).collect();
    assert_eq!(got_ids, want_ids, "top-10 ids in order");
    let mut worst = 0f32;
    for (i, v) in want_ids.iter().zip(top["values"].as_array().unwrap()) {
        let d = (last[*i as usize] - v.as_f64().unwrap() as f32).abs();
        worst = worst.max(d);
    }
    // the reference rounds to 5 decimals
    for (row, want) in r["prompt_logits_0_4_by_0_8"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        for (col, v) in want.as_array().unwrap().iter().enumerate() {
            let got = logits.i((0, row, col)).unwrap().to_scalar::<f32>().unwrap();
            worst = worst.max((got - v.as_f64().unwrap() as f32).abs());
        }
    }
    eprintln!("worst |logit - HF| = {worst:.2e}");
    assert!(worst < 1e-3, "logits differ from HF by {worst}");

    // greedy decoding, with and without the KV cache
    let tok = tokenizer::load(&dir).unwrap();
    let eot = ChatTemplate::from_model_dir(&dir)
        .unwrap()
        .end_of_turn(&tok)
        .unwrap();
    assert_eq!(
        (eot.text.as_str(), eot.single_id()),
        ("<|im_end|>", Some(2))
    );
    let stops = stop_ids(&dir, &eot);
    assert!(stops.contains(&2), "<|im_end|> is a stop id: {stops:?}");
    let want = ids(&r["greedy"]["ids"]);
    for no_cache in [false, true] {
        let p = SamplingParams {
            max_new_tokens: 40,
            no_cache,
            ..Default::default()
        };
        let g = generate(&model, &prompt, &p, &stops, |_| Ok(true)).unwrap();
        assert_eq!(g.ids, want, "no_cache={no_cache}");
        assert!(g.stopped);
        assert_eq!(
            tokenizer::decode(&tok, &g.ids).unwrap(),
            "The capital of France is Paris.<|im_end|>"
        );
    }
}

#[test]
fn kv_cache_logits_equal_full_forward_on_real_model() {
    let dir = real_model_dir().unwrap();
    let model = Llama::from_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    let prompt = ids(&reference().unwrap()["chat_prompt"]["ids"]);
    let x = Tensor::new(prompt.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let full = model.forward(&x, None).unwrap();
    let mut cache = model.new_cache();
    let n = prompt.len();
    let a = model
        .forward(&x.narrow(1, 0, n - 3).unwrap(), Some(&mut cache))
        .unwrap();
    let mut parts = vec![a];
    for i in n - 3..n {
        parts.push(
            model
                .forward(&x.narrow(1, i, 1).unwrap(), Some(&mut cache))
                .unwrap(),
        );
    }
    let inc = Tensor::cat(&parts, 1).unwrap();
    let d = max_abs_diff(&full, &inc) as f32;
    assert!(d < 1e-3, "cache vs full {d}");
}
