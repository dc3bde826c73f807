#!/usr/bin/env python3
"""Writes the Parquet fixtures of dataprep's tests (dataprep/tests/fixtures/parquet/) from the
sample dialogues, with pyarrow (what `datasets.Dataset.to_parquet` uses): the first 40
conversations in each record format (EmoLLM `conversation`, ShareGPT `conversations`, OpenAI
`messages`, Alpaca), each as NAME.parquet (snappy, pyarrow's default) and the same records as
NAME.jsonl, plus bad.parquet whose row 2 has no reply.
   pip install pyarrow && python3 scripts/make-parquet-fixtures.py"""
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
out = os.path.join(root, "dataprep", "tests", "fixtures", "parquet")
os.makedirs(out, exist_ok=True)
with open(os.path.join(root, "data", "counsel_train.jsonl"), encoding="utf-8") as f:
    convs = [json.loads(line)["conversation"] for line in f if line.strip()][:40]


def sharegpt(c):
    turns = []
    if c[0].get("system"):
        turns.append({"from": "system", "value": c[0]["system"]})
    for t in c:
        turns += [{"from": "human", "value": t["input"]}, {"from": "gpt", "value": t["output"]}]
    return {"conversations": turns}


def openai(c):
    msgs = [{"role": "system", "content": c[0]["system"]}] if c[0].get("system") else []
    for t in c:
        msgs += [{"role": "user", "content": t["input"]}, {"role": "assistant", "content": t["output"]}]
    return {"messages": msgs}


def alpaca(c):
    return {"instruction": c[0]["input"], "input": "", "output": c[0]["output"]}


def emollm(c):
    # every turn has a `system` column in Parquet (null but in the first): the same record
    return {"conversation": [{"system": t.get("system"), "input": t["input"], "output": t["output"]} for t in c]}


for name, make in [("emollm", emollm), ("sharegpt", sharegpt), ("openai", openai), ("alpaca", alpaca)]:
    rows = [make(c) for c in convs]
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(out, f"{name}.parquet"))
    with open(os.path.join(out, f"{name}.jsonl"), "w", encoding="utf-8") as f:
        for r in rows:
            if name == "emollm":  # as JSON writes it: no null system
                r = {"conversation": [{k: v for k, v in t.items() if v is not None} for t in r["conversation"]]}
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
bad = [alpaca(c) for c in convs[:5]]
bad[2]["output"] = None
pq.write_table(pa.Table.from_pylist(bad), os.path.join(out, "bad.parquet"))
print("wrote", sorted(os.listdir(out)))
