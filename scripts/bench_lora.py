#!/usr/bin/env python3
"""The PyTorch side of `make bench`: LoRA training throughput of HF transformers + peft with the
settings `bench-lora` uses, so the two are measured the same way in one run.

Random token ids (uniform over the vocabulary), labels = inputs, LoRA r=16 alpha=32 dropout=0.05
on q,k,v,o,gate,up,down_proj, torch.optim.AdamW (lr 2e-4, PyTorch's default weight decay 0.01,
as bench-lora). The first --warmup steps are not timed; tokens/s is batch*seq over the median
timed step. The last line is `RESULT {json}`.

Needs torch, transformers and peft (scripts/hf-env.sh makes such an environment).
  python scripts/bench_lora.py --model models/smollm2-135m-instruct --seq 256 --batch 1 [--grad-ckpt]
  python scripts/bench_lora.py --random-config deepseek-7b --device cuda --dtype bf16 --seq 1024 --batch 2
"""
import argparse
import json
import os
import resource
import statistics
import time

# The same shapes as bench-lora's presets (common/src/bench.rs).
PRESETS = {
    "deepseek-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=30,
                        num_attention_heads=32, num_key_value_heads=32, vocab_size=102400,
                        max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True),
}
ROPE_THETA = {"deepseek-7b": 10000.0, "smollm2-135m": 100000.0}
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def load(a, torch, dtype, device):
    from transformers import AutoModelForCausalLM, LlamaConfig
    if a.random_config in PRESETS:
        cfg = LlamaConfig(**PRESETS[a.random_config])
        theta = ROPE_THETA[a.random_config]
        if isinstance(getattr(cfg, "rope_parameters", None), dict):
            cfg.rope_parameters["rope_theta"] = theta
        else:
            cfg.rope_theta = theta
    elif a.random_config:
        from transformers import AutoConfig
        cfg = AutoConfig.from_pretrained(a.random_config)
    else:
        extra = {"num_hidden_layers": a.layers} if a.layers else {}
        return AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, **extra).to(device)
    if a.layers:
        cfg.num_hidden_layers = a.layers
    torch.manual_seed(a.seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a model directory (Hugging Face layout)")
    src.add_argument("--random-config", help=f"random init of a preset {sorted(PRESETS)} or a config.json")
    ap.add_argument("--layers", type=int, default=0, help="override num_hidden_layers")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8, help="steps in total, warmup included")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", choices=["f32", "bf16", "f16"], help="default f32 on cpu, bf16 on cuda")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (non-reentrant)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import peft
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[
        a.dtype or ("bf16" if a.device == "cuda" else "f32")]
    device = torch.device(a.device)
    threads = a.threads or os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(a.seed)
    load_avg = os.getloadavg()[0]
    t = time.perf_counter()
    model = load(a, torch, dtype, device)
    load_s = time.perf_counter() - t
    vocab = model.config.vocab_size
    model.config.use_cache = False
    if a.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout,
                                             target_modules=MODULES, bias="none", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr)
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator().manual_seed(a.seed)
    step_s, loss = [], float("nan")
    for step in range(a.steps):
        ids = torch.randint(0, vocab, (a.batch, a.seq), generator=gen).to(device)
        if a.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
        if a.device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        if step >= a.warmup:
            step_s.append(dt)
        print(f"step {step}{' (warmup)' if step < a.warmup else ''}: loss {loss:.4f} {a.batch * a.seq / dt:.1f} tok/s", flush=True)
    med = statistics.median(step_s)
    res = {
        "side": "pytorch+peft", "seq": a.seq, "batch": a.batch, "grad_ckpt": a.grad_ckpt,
        "device": a.device, "dtype": str(dtype).removeprefix("torch."), "threads": threads,
        "median_step_s": round(med, 4), "tokens_per_s": round(a.batch * a.seq / med, 2),
        "trainable_params": sum(p.numel() for p in params), "final_loss": round(loss, 5),
        "load_s": round(load_s, 2), "peak_rss_mib": round(rss_peak_mib(), 1),
        "loadavg_start": round(load_avg, 2), "loadavg_end": round(os.getloadavg()[0], 2),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
    }
    if a.device == "cuda":
        res["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        # what dialora reports on CUDA (total - free: the pool's high-water mark and the context)
        # compares with PyTorch's reserved memory plus its context, not with allocated memory
        res["peak_gpu_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        free, total = torch.cuda.mem_get_info()
        res["gpu_used_now_mib"] = round((total - free) / 2**20, 1)
        res["gpu"] = torch.cuda.get_device_name()
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main()
