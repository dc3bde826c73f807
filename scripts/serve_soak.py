#!/usr/bin/env python3
"""A bounded soak of `infer --serve` on loopback: N clients x M requests, a mix of plain and
streaming completions (some with logprobs or penalties, over the base and the adapters), streams
dropped mid-way, malformed bodies, over-long prompts. Every well-formed request must be
answered, every bad one must get its 4xx, the server must stay up, and once the load is over
/health must show nothing running or waiting and /metrics must count the requests. With
--pid, the server's resident memory before, after the warm-up and at the end is printed.

  target/release/infer --model models/smollm2-135m-instruct --serve 127.0.0.1:8000 &
  python3 scripts/serve_soak.py --base-url http://127.0.0.1:8000 --clients 16 --requests 50 --pid $!
"""
import argparse
import json
import random
import threading
import time
import urllib.error
import urllib.request


def rss_mib(pid):
    if not pid:
        return None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def post(base, body, raw=None, stream=False, read_bytes=None, timeout=600):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=data,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            if read_bytes is not None:
                r.read(read_bytes)  # then leave: the connection closes with the stream unread
                return r.status, None
            text = r.read().decode()
            return r.status, text
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=50, help="per client")
    ap.add_argument("--pid", type=int, default=None, help="the server's pid, for its memory")
    a = ap.parse_args()
    base = a.base_url.rstrip("/")
    models = [m["id"] for m in json.load(urllib.request.urlopen(f"{base}/v1/models"))["data"]]
    print(f"models: {models}; rss at start: {rss_mib(a.pid)} MiB")
    counts = {"ok": 0, "dropped": 0, "bad_ok": 0, "fail": []}
    lock = threading.Lock()
    long_prompt = "word " * 9000

    def one(rng, c, i):
        kind = rng.choice(["plain", "plain", "stream", "stream", "logprobs", "penalty",
                           "drop", "malformed", "badtype", "toolong"])
        msg = [{"role": "user", "content": f"Client {c} asks question {i}: how do I relax?"}]
        body = {"model": rng.choice(models), "messages": msg, "max_tokens": rng.choice([4, 8, 16])}
        if kind == "plain":
            s, t = post(base, body)
            ok = s == 200 and json.loads(t)["choices"][0]["finish_reason"] in ("stop", "length")
        elif kind == "stream":
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
            s, t = post(base, body)
            ok = s == 200 and t.rstrip().endswith("data: [DONE]") and '"usage"' in t
        elif kind == "logprobs":
            body.update(logprobs=True, top_logprobs=2)
            s, t = post(base, body)
            ok = s == 200 and json.loads(t)["choices"][0]["logprobs"]["content"]
        elif kind == "penalty":
            body.update(presence_penalty=0.5, frequency_penalty=0.5, temperature=0.8, seed=i)
            s, t = post(base, body)
            ok = s == 200
        elif kind == "drop":
            body.update(stream=True, max_tokens=64)
            s, _ = post(base, body, read_bytes=200)
            with lock:
                counts["dropped"] += 1
            return
        elif kind == "malformed":
            s, t = post(base, None, raw=b'{"messages": [ {"role": "user", "content": ')
            ok = s == 400
        elif kind == "badtype":
            s, t = post(base, {"messages": msg, "max_tokens": "many"})
            ok = s == 400
        else:
            s, t = post(base, {"messages": [{"role": "user", "content": long_prompt}], "max_tokens": 8})
            ok = s == 400 and "context" in t
        with lock:
            if ok:
                counts["bad_ok" if kind in ("malformed", "badtype", "toolong") else "ok"] += 1
            else:
                counts["fail"].append((kind, s, (t or "")[:200]))

    def worker(c):
        rng = random.Random(c)
        for i in range(a.requests):
            one(rng, c, i)

    t0 = time.time()
    threads = [threading.Thread(target=worker, args=(c,)) for c in range(a.clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.time() - t0
    # the dropped streams end at the engine's next step; then nothing runs or waits
    for _ in range(100):
        h = json.load(urllib.request.urlopen(f"{base}/health"))
        if h["running"] == 0 and h["waiting"] == 0:
            break
        time.sleep(0.1)
    metrics = urllib.request.urlopen(f"{base}/metrics").read().decode()
    finished = sum(float(l.split()[-1]) for l in metrics.splitlines()
                   if l.startswith("dialora_request_success_total"))
    res = {"clients": a.clients, "requests": a.clients * a.requests, "wall_s": round(wall, 1),
           "answered": counts["ok"], "bad_requests_refused": counts["bad_ok"],
           "dropped_streams": counts["dropped"], "failures": len(counts["fail"]),
           "health_after": h, "finished_in_metrics": finished, "rss_end_mib": rss_mib(a.pid)}
    print("RESULT " + json.dumps(res))
    if counts["fail"] or h["running"] or h["waiting"]:
        raise SystemExit(f"soak failed: {counts['fail'][:5]} health {h}")


if __name__ == "__main__":
    main()
