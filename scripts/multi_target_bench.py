"""Several targets of one text: one backward per target (the loop) against one batched backward,
on the embedded model, each in a fresh child process (time, peak RSS), side by side in one run.

    PYTHONPATH=$PWD python scripts/multi_target_bench.py --tokens 256 --targets 64

Modes (each child explains the last ``--targets`` positions of a ``--tokens``-token text, each
position's target the next token of the text, AttnLRP):

* ``loop``: ``explain_positions(batch_size=1)``, one forward and one backward per target;
* ``batched``: ``explain_positions(batch_size=None)``, one forward and one backward batched over all
  targets (``is_grads_batched``);
* ``batched/K``: the same, K targets per backward;
* ``rows/K``: the design not taken: the text cut after each position as its own row of a padded
  batch (``explain_batch``), K rows per forward and backward.

Every mode's relevances are compared with the loop's (largest relative L2 difference).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time, torch
from lucidlm import LLM
from lucidlm.explain.batch import explain_batch
from lucidlm.explain.multi import explain_positions
mode, n_tokens, n_targets, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(1)
def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
llm = LLM.load()
text = open("README.md", encoding="utf-8").read()
ids = llm.tokenizer.encode(text)[:n_tokens]
positions = list(range(n_tokens - 1 - n_targets, n_tokens - 1))
loaded = hwm()
start = time.perf_counter()
name, _, k = mode.partition("/")
size = int(k) if k else None
if name == "rows":
    found = []
    for c in range(0, n_targets, size):
        chunk = positions[c:c + size]
        found += explain_batch(llm.model, None, [ids[:p + 1] for p in chunk], targets=[ids[p + 1] for p in chunk])
else:
    found = explain_positions(llm.model, None, ids, positions=positions, batch_size=1 if name == "loop" else size)
seconds = time.perf_counter() - start
torch.save([e.relevance for e in found], out)
print(json.dumps({"mode": mode, "seconds": seconds, "peak_mib": hwm(), "after_load_mib": loaded}))
"""


def run_child(mode: str, tokens: int, targets: int, out: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, mode, str(tokens), str(targets), out],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--targets", type=int, default=64)
    parser.add_argument("--modes", default="loop,batched,batched/16,rows/8")
    parser.add_argument("--scratch", default="/tmp")
    args = parser.parse_args()
    import torch

    rows, reference = [], None
    for mode in args.modes.split(","):
        out = f"{args.scratch}/multi_target_{mode.replace('/', '_')}.pt"
        t = time.perf_counter()
        result = run_child(mode, args.tokens, args.targets, out)
        relevances = torch.load(out, weights_only=True)
        if reference is None:
            reference = relevances
        result["max_rel_l2_vs_first"] = max(float((a.double() - b.double()).norm() / b.double().norm())
                                            for a, b in zip(relevances, reference))
        result["wall_with_load_s"] = time.perf_counter() - t
        rows.append(result)
        print(json.dumps(result), flush=True)
    print(f"\n{args.targets} targets over a {args.tokens}-token text, embedded SmolLM2-135M, AttnLRP, CPU, 1 thread\n")
    print("| mode | time (s) | peak RSS (MiB) | RSS after load (MiB) | rel. L2 vs loop |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['seconds']:.1f} | {r['peak_mib']:.0f} | {r['after_load_mib']:.0f} "
              f"| {r['max_rel_l2_vs_first']:.1e} |")


if __name__ == "__main__":
    main()
