"""``lucidlm evaluate MODEL --tasks T1,T2 --out DIR``: lm-evaluation-harness benchmarks run on
lucidlm's own model (:class:`lucidlm.evaluate.harness.LucidLM`), with its adapter, KV-cache
policy and dtype, as ``litgpt evaluate`` names it. (The faithfulness of explanations is
``lucidlm faithfulness DIR``.)

Writes ``DIR/results.json`` in the harness's own schema (``results[task]["acc,none"]`` ...) with
the run's ``config`` (model, adapter, policy, budget, dtype), and with ``--log-samples`` one
``samples_TASK.jsonl`` per task; everything is written to a temporary directory first and moved
into DIR at the end, so a failed run leaves nothing there. Prints the harness's table.

Needs ``pip install lucidlm[eval]``; the harness and torch are imported only when the command runs.

>>> args = EVALUATE.parse(["m", "--tasks", "a,b", "--out", "o", "--cache-tokens", "25%"])
>>> args.tasks, args.cache_tokens, args.num_fewshot
('a,b', '25%', None)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import EvaluationError
from .options import Command, Paths, add_adapter, add_cache, add_dtype, load, non_negative_int, positive


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="HF directory, .gguf file or hub repo id (default: the embedded model)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task (or group) names")
    p.add_argument("--include-path", type=Path, default=None, metavar="DIR",
                   help="a directory of task YAML files of your own (default: the harness's tasks only)")
    p.add_argument("--num-fewshot", type=non_negative_int, default=None, metavar="N",
                   help="few-shot examples per prompt (default: each task's own)")
    p.add_argument("--limit", type=positive, default=None, metavar="N",
                   help="evaluate only the first N examples of each task (default: all)")
    p.add_argument("--batch-size", type=positive, default=8, metavar="N", help="requests per forward pass")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="render each prompt with the checkpoint's chat template")
    add_adapter(p, "evaluate MODEL with this adapter attached")
    add_cache(p)
    add_dtype(p, "the weights' dtype in memory")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="where results.json is written")
    p.add_argument("--log-samples", action="store_true",
                   help="also write every sample's prompt, responses and metrics (samples_TASK.jsonl)")


def _inputs(args: argparse.Namespace) -> Paths:
    return [("--include-path", args.include_path)]


def _outputs(args: argparse.Namespace) -> Paths:
    return [("--out", args.out)]


def run(args: argparse.Namespace) -> int:
    """Check the tasks, load the model, run the harness, then write OUT atomically."""
    from ..evaluate.harness import require_lm_eval, task_manager, task_names

    names = task_names(args.tasks)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EvaluationError(f"{out}: exists and is not an empty directory (choose a new --out)")
    lm_eval = require_lm_eval()
    manager = task_manager(names, args.include_path)
    from ..evaluate.harness import LucidLM

    lm = LucidLM(load(args), kv_cache=args.kv_cache, cache_tokens=args.cache_tokens, dtype=args.dtype,
                 batch_size=args.batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=args.num_fewshot, limit=args.limit,
                                      task_manager=manager, log_samples=args.log_samples,
                                      apply_chat_template=args.apply_chat_template, batch_size=args.batch_size)
    if results is None:
        raise EvaluationError("the harness returned no results")
    results.setdefault("config", {}).update(config_block(lm, args))
    written = write_results(results, out)
    from lm_eval.utils import make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    print(f"wrote {written}", file=sys.stderr)
    return 0


def config_block(lm, args: argparse.Namespace) -> dict:
    """What results.json records of the run: model, adapter, policy, budget, dtype."""
    return {"model": str(lm.llm.source or lm.llm.name), "model_name": lm.llm.name,
            "adapter": None if args.adapter is None else str(args.adapter),
            "policy": None if lm.policy is None else str(lm.policy), "budget": lm.cache_tokens, "dtype": args.dtype,
            "batch_size": args.batch_size, "apply_chat_template": args.apply_chat_template}


def write_results(results: dict, out: Path) -> Path:
    """``results.json`` (and ``samples_TASK.jsonl``) in ``out``, built in a temporary directory
    beside it and moved in only when complete."""
    from lm_eval.utils import handle_non_serializable

    samples = results.pop("samples", None) or {}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (staging / "results.json").write_text(json.dumps(results, indent=2, default=handle_non_serializable,
                                                         ensure_ascii=False) + "\n")
        for task, rows in samples.items():
            with open(staging / f"samples_{task}.jsonl", "w") as f:
                for row in rows:
                    f.write(json.dumps(row, default=handle_non_serializable, ensure_ascii=False) + "\n")
        if out.is_dir():
            out.rmdir()  # empty (checked before the run)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out / "results.json"


EVALUATE = Command("evaluate", "lm-evaluation-harness benchmarks on lucidlm's own model (adapters, KV-cache "
                               "policies, dtypes as they run here)", add_arguments, run, inputs=_inputs,
                   outputs=_outputs, model=lambda args: ("MODEL", args.model))
