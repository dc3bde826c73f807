#!/usr/bin/env python3
"""Writes the PyTorch-checkpoint fixture of the weight-loading tests
(common/tests/fixtures/bin-model/): a tiny random Llama with SmolLM2's vocabulary (hidden 16,
2 layers, bf16, tied embeddings), once as transformers 4.x's
`save_pretrained(safe_serialization=False, max_shard_size=...)` writes it
(pytorch_model-00001-of-00002.bin + pytorch_model-00002-of-00002.bin, each a torch.save'd
state dict, and pytorch_model.bin.index.json) and once as model.safetensors in a sibling
directory with the same tensors. The tests copy the real model's tokenizer beside them. Also not-a-state-dict.bin, a pickled list.
   pip install torch safetensors numpy && python3 scripts/make-bin-fixture.py
With --from MODEL_DIR --out DIR [--shards N] it writes MODEL_DIR's safetensors weights as N
.bin shards the same way (for BENCHMARKS.md: merger with a .bin base), other files copied."""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file


def save_shards(sd, out, n):
    """transformers 4.x's layout: N torch.save'd state dicts and the index."""
    names = list(sd)
    per = -(-len(names) // n)
    parts = [names[i:i + per] for i in range(0, len(names), per)]
    weight_map, total = {}, 0
    for k, part in enumerate(parts, 1):
        fname = f"pytorch_model-{k:05d}-of-{len(parts):05d}.bin"
        torch.save({x: sd[x] for x in part}, os.path.join(out, fname))
        for x in part:
            weight_map[x] = fname
            total += sd[x].numel() * sd[x].element_size()
    with open(os.path.join(out, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


if "--from" in sys.argv:
    src, out = sys.argv[sys.argv.index("--from") + 1], sys.argv[sys.argv.index("--out") + 1]
    n = int(sys.argv[sys.argv.index("--shards") + 1]) if "--shards" in sys.argv else 2
    os.makedirs(out, exist_ok=True)
    sd = {}
    for f in sorted(os.listdir(src)):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(src, f)))
        elif f != "model.safetensors.index.json":
            if os.path.isfile(os.path.join(src, f)):
                shutil.copy(os.path.join(src, f), out)
    save_shards(sd, out, n)
    print("wrote", out)
    sys.exit(0)

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
base = os.path.join(root, "common", "tests", "fixtures")
hidden, inter, layers, heads, kv, vocab = 16, 32, 2, 4, 2, 49152
config = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
    "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
    "num_key_value_heads": kv, "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "max_position_embeddings": 512, "tie_word_embeddings": True, "bos_token_id": 1,
    "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "bfloat16",
}
g = torch.Generator().manual_seed(0)
hd = hidden // heads
sd = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g) * 0.5}
for i in range(layers):
    p = f"model.layers.{i}."
    for name, shape in [
        ("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (kv * hd, hidden)),
        ("self_attn.v_proj", (kv * hd, hidden)), ("self_attn.o_proj", (hidden, hidden)),
        ("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)),
        ("mlp.down_proj", (hidden, inter)),
    ]:
        sd[p + name + ".weight"] = torch.randn(*shape, generator=g) * 0.3
    sd[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
    sd[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
sd["model.norm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
sd = {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}

bin_dir, st_dir = os.path.join(base, "bin-model"), os.path.join(base, "bin-model-safetensors")
for d in (bin_dir, st_dir):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
# two shards as transformers splits them
save_shards(sd, bin_dir, 2)
torch.save(["not", "a", "state", "dict"], os.path.join(base, "not-a-state-dict.bin"))
save_file(sd, os.path.join(st_dir, "model.safetensors"), metadata={"format": "pt"})
print("wrote", bin_dir, st_dir)
