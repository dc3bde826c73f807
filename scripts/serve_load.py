#!/usr/bin/env python3
"""Drives `infer --serve` with the official `openai` Python client: a few checks of what an
app sees (models, a completion, a stream, an error), then a bounded load test: N concurrent
clients, each sending M chat completions. Prints throughput and latency percentiles; the last
line is `RESULT {json}`. Any failed request fails the run.

Every load request streams (with usage), so the time to the first token is measured too.
--models A,B,C,D spreads the clients over several models (adapters); --skip-checks runs the
load alone (llama-server accepts any model name).

Needs: python3 -m pip install openai
  target/release/infer --model models/smollm2-135m-instruct --serve 127.0.0.1:8000 &
  python3 scripts/serve_load.py --base-url http://127.0.0.1:8000/v1 --clients 8 --requests 20
"""
import argparse
import json
import statistics
import threading
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default=None, help="default: the first model the server lists")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=20, help="per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--models", default=None,
                    help="comma-separated models spread over the clients (client c asks models[c %% n])")
    ap.add_argument("--extra-body", default=None,
                    help="JSON merged into every load request (e.g. llama-server's {\"cache_prompt\": false})")
    ap.add_argument("--skip-checks", action="store_true",
                    help="only the load (for servers that accept any model name, as llama-server)")
    a = ap.parse_args()

    import openai
    from openai import OpenAI

    client = OpenAI(base_url=a.base_url, api_key="not-needed", max_retries=0, timeout=600)
    models = [m.id for m in client.models.list().data]
    model = a.model or models[0]
    print(f"models: {models}")
    spread = a.models.split(",") if a.models else [model]
    if not a.skip_checks:
        checks(client, model, a, openai)
    run_load(client, spread, a, openai)


def checks(client, model, a, openai):
    r = client.chat.completions.create(
        model=model, max_tokens=a.max_tokens,
        messages=[{"role": "user", "content": "I can't sleep before exams. Any advice?"}])
    print(f"completion ({r.choices[0].finish_reason}, {r.usage.completion_tokens} tokens): {r.choices[0].message.content!r}")
    parts = []
    for ch in client.chat.completions.create(
            model=model, max_tokens=a.max_tokens, stream=True,
            messages=[{"role": "user", "content": "I can't sleep before exams. Any advice?"}]):
        if ch.choices and ch.choices[0].delta.content:
            parts.append(ch.choices[0].delta.content)
    streamed = "".join(parts)
    print(f"streamed: {streamed!r} (same as the completion: {streamed == r.choices[0].message.content})")
    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
        raise SystemExit("an unknown model was accepted")
    except openai.NotFoundError as e:
        print(f"unknown model -> {e.status_code}: {e.body['message'] if isinstance(e.body, dict) else e.body}")



def run_load(client, spread, a, openai):
    prompts = ["I feel anxious about my exams.", "My friend stopped talking to me.",
               "I can't focus at work lately.", "How do I tell my parents I'm struggling?"]
    extra = json.loads(a.extra_body) if a.extra_body else None
    lat, toks, ttft, errors = [], [], [], []
    lock = threading.Lock()

    def worker(c):
        for i in range(a.requests):
            t = time.perf_counter()
            try:
                first, usage = None, None
                for ch in client.chat.completions.create(
                        model=spread[c % len(spread)], max_tokens=a.max_tokens, seed=c * 1000 + i,
                        stream=True, stream_options={"include_usage": True}, extra_body=extra,
                        messages=[{"role": "user", "content": prompts[(c + i) % len(prompts)]}]):
                    if first is None and ch.choices and ch.choices[0].delta.content:
                        first = time.perf_counter() - t
                    if ch.usage is not None:
                        usage = ch.usage
                with lock:
                    lat.append(time.perf_counter() - t)
                    ttft.append(first if first is not None else lat[-1])
                    toks.append(usage.completion_tokens)
            except Exception as e:  # counted, reported, and the run fails
                with lock:
                    errors.append(repr(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c,)) for c in range(a.clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    lat.sort()
    pct = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")
    res = {"clients": a.clients, "requests": a.clients * a.requests, "ok": len(lat), "errors": len(errors),
           "wall_s": round(wall, 2), "requests_per_s": round(len(lat) / wall, 3),
           "completion_tokens_per_s": round(sum(toks) / wall, 1),
           "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
           "latency_p95_s": round(pct(0.95), 3),
           "ttft_p50_s": round(statistics.median(ttft), 3) if ttft else None,
           "models": spread, "max_tokens": a.max_tokens, "openai": openai.__version__}
    print(f"load: {res['ok']}/{res['requests']} ok in {wall:.1f} s: {res['requests_per_s']} req/s, "
          f"{res['completion_tokens_per_s']} tokens/s, latency p50 {res['latency_p50_s']} s, p95 {res['latency_p95_s']} s, "
          f"first token p50 {res['ttft_p50_s']} s")
    print("RESULT " + json.dumps(res))
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g. {errors[0]}")


if __name__ == "__main__":
    main()
