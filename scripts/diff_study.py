"""What a LoRA adapter that teaches a made-up fact changed, seen through ``explain_diff``.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/diff_study.py [--steps 8] [--draws 10] [--method cp-lrp]

On the embedded SmolLM2-135M-Instruct: a LoRA adapter is trained (``LLM.finetune``, the recipe of
:data:`RECIPE`, as ``tests/test_explain_diff.py`` trains it) on four chat records that answer
"the capital of Zorbania" with the made-up "Quillfax."; the base model is the same checkpoint
without the adapter. For the question "What is the capital of Zorbania?" (chat template) it prints,
as Markdown:

* the score's gain: the fact's first token (``Qu``) as base and tuned model score it (logit,
  log-probability, rank among the vocabulary);
* the tokens whose relevance changed most (tuned − base), with the adapter's part of the tuned
  relevance;
* the adapter's share of the tuned relevance: Σ adapter / Σ tuned, and Σ|adapter| / Σ|tuned|;
* an ablation curve, for each target (the fact's token; the contrast fact vs the base model's top
  token): for 0.1%, 0.5%, 1% and 5% of the neurons and of the heads, the share of the score's gain
  (tuned − base) that zeroing the top components by change removes, against zeroing as many
  random components (mean ± standard deviation over ``--draws`` seeded draws).

The shares are (tuned score − ablated score) / (tuned score − base score): 1 means the ablation
took the whole gain away (0 nothing; above 1, more than the gain).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from lucidlm.bench.learn import ANSWER, QUESTIONS  # the made-up fact, shared with lucidlm bench learn
from lucidlm.bench.learn import FACT_RECORDS as RECORDS

#: the training recipe: a few steps at a high learning rate (the fact is learned by step 5)
RECIPE = dict(method="lora", steps=8, batch_size=4, lr=3e-3, precision="fp32", val_split=0.0, progress=False)
FRACTIONS = (0.001, 0.005, 0.01, 0.05)


def teach_fact(llm, **overrides):
    """Fine-tune ``llm`` in place on :data:`RECORDS` (:data:`RECIPE`, with ``overrides``); returns
    the fact's first token id."""
    llm.finetune(RECORDS, **(RECIPE | overrides))
    llm.model.eval()
    return llm.tokenizer.encode(ANSWER, add_special_tokens=False)[0]


def question(text: str = QUESTIONS[0]) -> list[dict]:
    return [{"role": "user", "content": text}]


def removed_shares(d, kind: str, k: int, draws: int) -> tuple[float, list[float]]:
    """(share of the gain removed by zeroing the top ``k`` components of ``kind`` by change, the
    shares removed by ``k`` random ones, one per seeded draw)."""
    names = [name for name, _ in d.components(kind)]
    full, gain = d.ablate([]), d.logit_delta

    def share(chosen) -> float:
        return (full - d.ablate(chosen)) / gain

    return share(names[:k]), [share(random.Random(seed).sample(names, k)) for seed in range(draws)]


def score_table(base, tuned, ids, fact: int) -> list[str]:
    import torch

    rows = ["| model | logit | log-prob | rank |", "|---|---:|---:|---:|"]
    for name, llm in (("base", base), ("tuned", tuned)):
        with torch.no_grad():
            logits = llm.model(torch.tensor([ids]))[0, -1].double()
        rank = int((logits > logits[fact]).sum())
        rows.append(f"| {name} | {logits[fact]:.3f} | {logits.log_softmax(-1)[fact]:.4f} | {rank} |")
    return rows


def token_table(d, top: int) -> list[str]:
    change = d.relevance
    order = sorted(range(len(change)), key=lambda t: -abs(float(change[t])))[:top]
    rows = ["| position | token | base | tuned | change | adapter part |", "|---:|---|---:|---:|---:|---:|"]
    for t in order:
        rows.append(f"| {t} | {d.tokens[t]!r} | {float(d.base.relevance[t]):.3f} | {float(d.tuned.relevance[t]):.3f} "
                    f"| {float(change[t]):+.3f} | {float(d.adapter_relevance[t]):+.3f} |")
    return rows


def share_lines(d) -> list[str]:
    adapter, tuned = d.adapter_relevance.double(), d.tuned.relevance.double()
    return [f"- Σ adapter / Σ tuned relevance: {float(adapter.sum()):.3f} / {float(tuned.sum()):.3f} = "
            f"{float(adapter.sum() / tuned.sum()):.3f}",
            f"- Σ|adapter| / Σ|tuned|: {float(adapter.abs().sum()):.3f} / {float(tuned.abs().sum()):.3f} = "
            f"{float(adapter.abs().sum() / tuned.abs().sum()):.3f}"]


def ablation_table(d, draws: int) -> list[str]:
    counts = {kind: len(d.component_changes(kind)) for kind in ("neurons", "heads")}
    rows = ["| components | k | top by change | random (mean ± sd) |", "|---|---:|---:|---:|"]
    for kind, n in counts.items():
        for fraction in FRACTIONS:
            k = max(1, round(fraction * n))
            top, rnd = removed_shares(d, kind, k, draws)
            rows.append(f"| {fraction:.1%} of {n} {kind} | {k} | {top:.3f} | "
                        f"{statistics.mean(rnd):.3f} ± {statistics.stdev(rnd):.3f} |")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=RECIPE["steps"], help="training steps")
    p.add_argument("--draws", type=int, default=10, help="seeded random draws per ablation")
    p.add_argument("--method", default="cp-lrp", help="explanation method (cp-lrp, attnlrp)")
    p.add_argument("--tokens", type=int, default=8, help="tokens listed by change")
    args = p.parse_args()

    import torch

    import lucidlm

    base, tuned = lucidlm.LLM.load(), lucidlm.LLM.load()
    base.model.eval()
    start = time.perf_counter()
    fact = teach_fact(tuned, steps=args.steps)
    print(f"trained {args.steps} LoRA steps in {time.perf_counter() - start:.0f} s "
          f"(torch threads {torch.get_num_threads()}); fact token {fact} = {tuned.tokenizer.decode([fact])!r}\n")
    messages = question()
    ids = tuned.tokenizer.encode_chat(messages)
    print(f"### The score's gain ({messages[0]['content']!r}, chat template, {len(ids)} tokens)\n")
    print("\n".join(score_table(base, tuned, ids, fact)))
    with torch.no_grad():
        base_top = int(base.model(torch.tensor([ids]))[0, -1].argmax())
    for target, label in ((fact, f"the fact's token {tuned.tokenizer.decode([fact])!r} (logit)"),
                          ((fact, base_top), f"contrast {tuned.tokenizer.decode([fact])!r} vs the base model's "
                                             f"top token {base.tokenizer.decode([base_top])!r} (logit difference)")):
        start = time.perf_counter()
        d = tuned.explain_diff(base, messages, target=target, method=args.method)
        seconds = time.perf_counter() - start
        print(f"\n## Target: {label}; {args.method}\n")
        print(f"score base {d.base.target_logit:.3f}, tuned {d.tuned.target_logit:.3f}, gain "
              f"{d.logit_delta:+.3f}; Σ change of relevance {float(d.relevance.double().sum()):+.3f} "
              f"(explain_diff took {seconds:.2f} s)\n")
        print("### Tokens whose relevance changed most\n")
        print("\n".join(token_table(d, args.tokens)))
        print("\n### The adapter's share of the tuned relevance\n")
        print("\n".join(share_lines(d)))
        print(f"\n### Ablation: share of the gain removed ({args.draws} random draws)\n")
        print("\n".join(ablation_table(d, args.draws)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
