"""What one explanation diff costs next to one explanation, measured interleaved in one process.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/diff_cost.py [--lengths 256,1024] [--rounds 7]

``lucidlm bench explain`` measures each row in its own process, one after the other: on a machine
shared with other work, a burst of load lands on one row and not on the next. Here the four runs
take turns round after round, so that load slows them alike. Each is given as × one explanation:
the median of the per-round ratios, and in brackets the ratio of the fastest runs (the least
disturbed by other work):

* ``explain``: one cp-lrp explanation of the embedded model (what the bench's ``cp-lrp`` row runs);
* ``explain tuned``: the same for the copy with a LoRA adapter (peft's default layers, r=8, B
  random: the model the ``diff lora`` row explains);
* ``diff lora``, ``diff full``: :meth:`lucidlm.LLM.explain_diff` of that copy (the adapter split
  runs) and of a plain copy (a full fine-tune) against the model, as the bench's diff rows.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="256,1024", help="comma-separated prompt lengths in tokens")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds after one warm-up round")
    args = p.parse_args()

    import torch

    import lucidlm
    from lucidlm.bench.explain import prompt_ids, tuned_copy
    from lucidlm.explain.explainer import explain

    llm = lucidlm.LLM.load()
    llm.model.eval()
    lora, full = tuned_copy(llm, adapter=True), tuned_copy(llm, adapter=False)
    print(f"torch threads {torch.get_num_threads()}; × = per-round ratio to one cp-lrp explanation "
          f"(median over {args.rounds} rounds; fastest run / fastest explanation in brackets)\n")
    print("| tokens | explain s | explain tuned | diff lora | diff full |")
    print("|---:|---:|---:|---:|---:|")
    for n in (int(x) for x in args.lengths.split(",")):
        ids = prompt_ids(llm.tokenizer, n, llm.config.vocab_size)
        runs = {"explain": lambda: explain(llm.model, llm.tokenizer, ids, method="cp-lrp"),
                "explain tuned": lambda: explain(lora.model, lora.tokenizer, ids, method="cp-lrp"),
                "diff lora": lambda: lora.explain_diff(llm, ids, method="cp-lrp"),
                "diff full": lambda: full.explain_diff(llm, ids, method="cp-lrp")}
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                if round_:
                    seconds[name].append(time.perf_counter() - start)
        one = seconds["explain"]
        cells = [f"{statistics.median(one):.3f}"]
        for name in ("explain tuned", "diff lora", "diff full"):
            ratios = [s / o for s, o in zip(seconds[name], one)]
            cells.append(f"{statistics.median(ratios):.2f}× ({min(seconds[name]) / min(one):.2f}×)")
        print(f"| {n} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
