"""What a pipeline split costs on one machine: the embedded SmolLM2-135M loaded whole and split
in two by ``device_map`` (two CPU stand-in devices ``cpu:0``/``cpu:1``, so only the pipeline's own
work is measured: the hooks and the moves, no transfer), each in a fresh child process: peak RSS
after loading, after a greedy generation and after an explanation, decode tokens/s and the
explanation's time; and every block on its own stand-in (30 hops per forward). On GPUs the same
command with ``--map 'layers.0-14=cuda:0,layers.15-29=cuda:1'`` adds the transfers (the 30-part
row then names stand-ins, which a GPU machine runs on its CPU).

    PYTHONPATH=$PWD python scripts/device_map_cost.py [--tokens 64] [--prompt-tokens 512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch
from lucidlm import LLM
from lucidlm.commands.options import device_map
spec, new, prompt_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
llm = LLM.load(device_map=None if spec == "none" else device_map(spec))
out = {"load_MiB": rss()}
prompt = "The capital of France is"
llm.generate(prompt, max_new_tokens=4)  # warm-up
t = time.perf_counter()
llm.generate(prompt, max_new_tokens=new)
out["decode_tok_s"] = new / (time.perf_counter() - t)
out["generate_MiB"] = rss()
ids = (llm.tokenizer.encode("One, two, three, four, five, six, seven, eight. ") * prompt_tokens)[:prompt_tokens]
t = time.perf_counter()
e = llm.explain(ids)
out["explain_s"] = time.perf_counter() - t
out["explain_MiB"] = rss()
out["relevance_sum"] = float(e.relevance.sum())
print(json.dumps(out))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--map", default="layers.0-14=cpu:0,layers.15-29=cpu:1", help="the split to measure")
    args = p.parse_args()
    every_block = ",".join(f"layers.{i}=cpu:{i}" for i in range(30))  # the most hops SmolLM2 can make
    rows = {}
    for name, spec in (("whole", "none"), ("split", args.map), ("30 parts", every_block)):
        done = subprocess.run([sys.executable, "-c", CHILD, spec, str(args.tokens), str(args.prompt_tokens)],
                              capture_output=True, text=True, check=True)
        rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{'':8}{'load MiB':>10}{'gen MiB':>10}{'explain MiB':>13}{'decode tok/s':>14}{'explain s':>11}")
    for name, r in rows.items():
        print(f"{name:8}{r['load_MiB']:10.0f}{r['generate_MiB']:10.0f}{r['explain_MiB']:13.0f}"
              f"{r['decode_tok_s']:14.1f}{r['explain_s']:11.2f}")
    print("relevance sums:", {k: round(r["relevance_sum"], 6) for k, r in rows.items()})


if __name__ == "__main__":
    main()
