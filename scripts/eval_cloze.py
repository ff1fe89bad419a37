"""A local cloze task from the license texts in /usr/share/common-licenses, evaluated with
lm-evaluation-harness on the embedded model: dense and KV-cache policies at 50% and 25% of each
context (lucidlm.evaluate.harness.LucidLM), and time per 100 samples of lucidlm against the
harness's own HFLM on the same weights, in the same run.

Each sample: 120 words of a license, then four 8-word continuations (the true next 8 words and three
spans from elsewhere in the same license); multiple_choice, acc and acc_norm. The context is
prefilled and compressed, then the continuation is scored against what the cache kept.

    PYTHONPATH=. python scripts/eval_cloze.py --n 100 --out /tmp/cloze
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import time

LICENSES = pathlib.Path("/usr/share/common-licenses")


def build(out: pathlib.Path, n: int, context_words: int = 120, span: int = 8, seed: int = 0) -> pathlib.Path:
    rng = random.Random(seed)
    texts = {p.name: p.read_text(errors="replace").split() for p in sorted(LICENSES.iterdir())
             if p.is_file() and not p.is_symlink()}
    texts = {k: v for k, v in texts.items() if len(v) > 2000}
    rows = []
    names = sorted(texts)
    while len(rows) < n:
        words = texts[names[len(rows) % len(names)]]
        at = rng.randrange(context_words, len(words) - span)
        right = " " + " ".join(words[at:at + span])
        others = set()
        while len(others) < 3:
            j = rng.randrange(0, len(words) - span)
            if abs(j - at) > span:
                others.add(" " + " ".join(words[j:j + span]))
        choices = [right, *sorted(others)]
        rng.shuffle(choices)
        rows.append({"context": " ".join(words[at - context_words:at]), "choices": choices,
                     "answer": choices.index(right)})
    out.mkdir(parents=True, exist_ok=True)
    (out / "cloze.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "license_cloze.yaml").write_text(
        f"task: license_cloze\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {out / 'cloze.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{context}}\"\ndoc_to_target: answer\n"
        "doc_to_choice: \"{{choices}}\"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/cloze"))
    ap.add_argument("--policies", default="window,sink,h2o,snapkv,tova,knorm,pyramidkv")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from lucidlm import LLM
    from lucidlm.evaluate.harness import LucidLM

    tasks = build(args.out, args.n)
    manager = TaskManager(include_path=str(tasks))
    llm = LLM.load()
    hf_dir = llm.tokenizer_dir

    def run(lm):
        start = time.perf_counter()
        r = lm_eval.simple_evaluate(model=lm, tasks=["license_cloze"], task_manager=manager, verbosity="ERROR")
        per100 = (time.perf_counter() - start) * 100 / args.n
        m = r["results"]["license_cloze"]
        return m["acc,none"], m["acc_norm,none"], per100

    rows = []
    acc, norm, t_ours = run(LucidLM(llm, batch_size=args.batch_size))
    rows.append(("dense (lucidlm)", "-", acc, norm, t_ours))
    acc, norm, t_hf = run(HFLM(pretrained=str(hf_dir), batch_size=args.batch_size, device="cpu", dtype="float32"))
    rows.append(("dense (HFLM)", "-", acc, norm, t_hf))
    for policy in args.policies.split(","):
        for share in ("50%", "25%"):
            acc, norm, t = run(LucidLM(llm, kv_cache=policy, cache_tokens=share))
            rows.append((policy, share, acc, norm, t))
            print(rows[-1], flush=True)
    print("| policy | budget | acc | acc_norm | s / 100 samples |\n|---|---|---|---|---|")
    for name, share, acc, norm, t in rows:
        print(f"| {name} | {share} | {acc:.3f} | {norm:.3f} | {t:.1f} |")


if __name__ == "__main__":
    main()
