#!/usr/bin/env python3
"""Reads a TensorBoard log directory with TensorBoard's own EventAccumulator and prints, as
JSON, every scalar tag with its (step, value) pairs, every text tag with its values, and the
steps of the SessionLog START events of each event file, read raw (in file name order).
   read-tensorboard.py LOGDIR"""
import json
import os
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.proto.event_pb2 import SessionLog

acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "tensors": 0})
acc.Reload()
tags = acc.Tags()
out = {
    "scalars": {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags["scalars"]},
    "text": {t: [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(t)] for t in tags["tensors"]},
}
out["session_starts"] = [
    [e.step for e in EventFileLoader(os.path.join(sys.argv[1], f)).Load()
     if e.HasField("session_log") and e.session_log.status == SessionLog.START]
    for f in sorted(os.listdir(sys.argv[1])) if ".tfevents." in f
]
print(json.dumps(out))
