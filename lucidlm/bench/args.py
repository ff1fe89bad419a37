"""The benches' command-line options, torch-free: ``lucidlm bench --help`` (and every argument
error) answers without importing a bench module. Each bench module re-exports its function here as
``add_arguments``; :data:`BENCHES` is the list the ``lucidlm bench`` command offers.

>>> import argparse
>>> p = argparse.ArgumentParser(); add_kv(p)
>>> p.parse_args([]).policies
'window,sink,h2o,h2o+int8,h2o+int4'
>>> method_list("attnlrp, random", FAITHFULNESS_METHODS)
['attnlrp', 'random']
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

from ..dtypes import GGUF_EXPORT_TYPES, MODEL_DTYPES
from ..errors import ExplainError
from ..methods import EXPLAIN_METHODS, METHODS, check_method
from ..texts import LICENSES
from ..train.names import PRECISIONS
from ..ruler import TASKS as RULER_TASKS

#: the two engines the decode and train benches compare
ENGINES = ("lucidlm", "transformers")
#: bench train: lucidlm's default learning rate per method, used by both engines
LR = {"lora": 2e-4, "full": 2e-5}
#: bench kv: the default texts, and the policies measured beside dense
DEFAULT_POLICIES = "window,sink,h2o,h2o+int8,h2o+int4"
#: bench explain: the diff rows (``explain_diff`` of the model against a copy of itself): ``lora``
#: with a LoRA adapter on the copy (the adapter split runs), ``full`` a copy as a full fine-tune
DIFF_ROWS = ("lora", "full")
#: bench faithfulness: every method explain() offers, LRP and baselines (``random``: the floor to beat)
FAITHFULNESS_METHODS = EXPLAIN_METHODS
#: bench kv-bytes: the catalogue configs measured by default (MLA, GQA, MoE, sliding/full + sinks)
KV_BYTES_MODELS = ("DeepSeek-V2-Lite", "Llama-3.2-1B", "Qwen3-30B-A3B", "gpt-oss-20b", "Mistral-7B-v0.1")
#: the weights' dtypes of the kv, longctx and serve benches: float16 is left out, nothing there was
#: measured or checked in it
MEASURED_DTYPES = tuple(d for d in MODEL_DTYPES if d != "float16")

_MODEL_HELP = "HF directory or .gguf (default: the embedded SmolLM2-135M-Instruct)"
_THREADS_HELP = "torch threads (default: torch's choice)"
_DTYPE_HELP = "the weights' dtype"


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    p.add_argument("--dtype", default="float32", choices=MEASURED_DTYPES, help=_DTYPE_HELP)


#: bench decode: lucidlm's rows (each also +compile or +native); q8_0/q4_1/...: a GGUF file's blocks kept as they are
DECODE_ROWS = ("float32", "bfloat16", "int8-float32", "int8-bfloat16", "q8_0", "q4_0", "q4_1", "q4_k")
DEFAULT_DECODE_ROWS = ("float32", "bfloat16", "int8-float32", "int8-bfloat16", "q8_0", "q4_1")
NATIVE_DECODE_ROWS = ("float32", "int8-float32", "q8_0", "q4_1")  # the native decoder's: float32 activations


def add_decode(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=_MODEL_HELP)
    p.add_argument("--dtypes", default=",".join([*DEFAULT_DECODE_ROWS, *(f"{r}+compile" for r in DEFAULT_DECODE_ROWS),
                                                 *(f"{r}+native" for r in NATIVE_DECODE_ROWS)]),
                   help="comma-separated lucidlm rows to measure, from " + ", ".join(DECODE_ROWS) + " (int8-X: "
                        "lucidlm's weight-only int8 with X activations; q8_0, q4_1, ...: that GGUF file loaded with "
                        "keep_quantized=True), each optionally +compile (decode steps through torch.compile) or +native "
                        "(one C++ call per decode step); "
                        "transformers float32 always runs, as the reference")
    p.add_argument("--gguf", action="append", metavar="FILE",
                   help="a GGUF file for the rows of its type and for llama-bench (repeatable; default: the model "
                        "when it is a GGUF, and a Q8_0 export of the model made once into lucidlm's cache)")
    p.add_argument("--llama-bench", metavar="PATH",
                   help="llama.cpp's llama-bench binary: its rows on each GGUF file, same prompt length, new tokens "
                        "and threads (default threads 2)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length (prefill)")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens decoded after the prompt")
    p.add_argument("--threads", type=int, default=None, help=_THREADS_HELP)
    p.add_argument("--rounds", type=int, default=3, help="alternating runs per engine (median reported)")
    p.add_argument("--engine", choices=(*ENGINES, "runtime"), help=argparse.SUPPRESS)


#: bench quant: the default rows (float32@TYPE: that GGUF file dequantised, beside its kept blocks)
QUANT_ROWS = "float32,bfloat16,int8-float32,int8-bfloat16,float32@q8_0,q8_0,q4_1,float32@q4_0,q4_0"


def add_quant(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=_MODEL_HELP)
    p.add_argument("--rows", default=QUANT_ROWS,
                   help="comma-separated rows: float32, bfloat16, int8-float32, int8-bfloat16 (weight-only int8, "
                        "those activations), TYPE (a GGUF file of that type, q8_0, q4_0, q4_1, ..., loaded with "
                        "keep_quantized=True), float32@TYPE (that file dequantised to float32)")
    p.add_argument("--gguf", action="append", metavar="FILE",
                   help="a GGUF file for the rows of its type (repeatable; default: the model when it is a GGUF, "
                        "and lucidlm's export of the model for q8_0/q4_0, made once into lucidlm's cache)")
    p.add_argument("--text", type=Path, default=LICENSES / "Apache-2.0", help="text file (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens of the text scored")
    p.add_argument("--chunk-size", type=int, default=256, help="prefill chunk (tokens)")
    p.add_argument("--threads", type=int, default=None, help=_THREADS_HELP)


def add_explain(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=_MODEL_HELP)
    p.add_argument("--lengths", default="256,1024", help="comma-separated prompt lengths in tokens")
    p.add_argument("--methods", default="attnlrp,cp-lrp",
                   help="explanation methods to time (comma-separated, from " + ", ".join(METHODS) + ")")
    p.add_argument("--dtype", default="float32", choices=MODEL_DTYPES, help=_DTYPE_HELP)
    p.add_argument("--diffs", default=",".join(DIFF_ROWS),
                   help="explain_diff rows, measured with cp-lrp when --methods has it and reported as × one cp-lrp "
                        "explanation: comma-separated from lora (against a copy with a LoRA adapter: the adapter "
                        "split runs), full (against a plain copy: a full fine-tune), or none")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs after the memory run (median; 0: time the memory run itself)")
    p.add_argument("--threads", type=int, default=None, help=_THREADS_HELP)
    p.add_argument("--checkpointing", action="store_true",
                   help="instead: each method at each length plain and with activation checkpointing side by side, "
                        "the whole process's peak RSS and the time (e.g. --lengths 1024,4096,8192 --repeats 0)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: measure one row in this process
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)


def add_faithfulness(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=_MODEL_HELP)
    p.add_argument("--prompts", help="prompt file, one a line (default: the packaged factual/grammar prompts)")
    p.add_argument("--n-prompts", type=int, default=None, metavar="N",
                   help="use the first N prompts of the file (default: all of them)")
    p.add_argument("--methods", default=",".join(FAITHFULNESS_METHODS),
                   help="comma-separated, from " + ", ".join(FAITHFULNESS_METHODS))
    p.add_argument("--replacement", type=int, default=None, metavar="ID",
                   help="token id that replaces removed tokens (default: the single-space token, else 0)")
    p.add_argument("--score", default="prob", choices=["prob", "logit"],
                   help="what the curves track: the target's probability or its logit")
    p.add_argument("--keep-first", action="store_true",
                   help="never replace token 0 (often the attention sink; see lucidlm.evaluate.metrics)")
    p.add_argument("--threads", type=int, default=None, help=_THREADS_HELP)


def add_kv(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", type=Path, action="append", default=None,
                   help=f"text file to measure on (repeatable; default: the files in {LICENSES})")
    p.add_argument("--model", help=_MODEL_HELP)
    p.add_argument("--tokens", type=int, default=4096, help="text length in tokens")
    p.add_argument("--fractions", default="0.125,0.25,0.5", help="cache budgets as fractions of the text")
    p.add_argument("--policies", default=DEFAULT_POLICIES, help="comma-separated; dense always runs")
    p.add_argument("--chunk-size", type=int, default=256, help="prefill chunk (tokens)")
    p.add_argument("--decode-steps", type=int, default=64, help="greedy steps timed after the text")
    p.add_argument("--tasks", default=None, metavar="T1,T2",
                   help="lm-evaluation-harness tasks: print their accuracy with dense and each policy at each "
                        "fraction of every prompt instead of the perplexity table (needs lucidlm[eval]) "
                        "(default: none)")
    p.add_argument("--include-path", type=Path, default=None, metavar="DIR",
                   help="with --tasks: a directory of your own task YAMLs (default: none)")
    p.add_argument("--limit", type=int, default=100, help="with --tasks: samples per task")
    _add_device(p)


def add_longctx(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=_MODEL_HELP)
    p.add_argument("--tasks", default="passkey,niah_single",
                   help="comma-separated RULER-style tasks, from " + ", ".join(RULER_TASKS))
    p.add_argument("--lengths", default="1024,2048,4096", help="comma-separated prompt lengths in tokens")
    p.add_argument("--depths", default="0,25,50,75,100",
                   help="where the fact sits in the haystack, in percent (0: its start, 100: just before the question)")
    # every eviction policy of lucidlm.cache.spec; qh2o with the int8 buffers its score is made for
    p.add_argument("--policies", default="window,sink,h2o,snapkv,tova,knorm,pyramidkv,h2o-vlen,qh2o+int8",
                   help="comma-separated specs; dense always runs")
    p.add_argument("--cache-tokens", default="50%,25%", metavar="B1,B2",
                   help="cache budgets: shares of each prompt kept (25%%: kvpress's compression ratio 0.75) or "
                        "token counts (default: %(default)s)")
    p.add_argument("--trials", type=int, default=1, help="prompts per task, length and depth")
    p.add_argument("--chunk-size", type=int, default=256, help="prefill chunk (tokens)")
    p.add_argument("--text", type=Path, action="append", default=None, metavar="FILE",
                   help=f"haystack text (repeatable; default: the files in {LICENSES})")
    p.add_argument("--results", type=Path, default=None, metavar="DIR",
                   help="also write kvpress's evaluation folders (predictions.csv, metrics.json, config.yaml) under "
                        "DIR, one per policy, budget and length (default: none)")
    p.add_argument("--heatmap", type=Path, default=None, metavar="FILE.png",
                   help="also draw accuracy by depth and length, one panel per policy and budget (default: no heatmap)")
    p.add_argument("--seed", type=int, default=0, help="seed of the keys, needles and haystack windows")
    _add_device(p)


def add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=_MODEL_HELP)
    p.add_argument("--clients", default="1,4,8,16", help="comma-separated concurrent client counts")
    p.add_argument("--seconds", type=float, default=10.0, help="how long each client count runs")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per reply")
    p.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch (sequences decoded together)")
    p.add_argument("--dtype", default="bfloat16", choices=MEASURED_DTYPES,
                   help="the server's --dtype (default: bfloat16, whose prefill runs 3x faster than float32's on a CPU with "
                        "AMX/AVX512-BF16)")


def add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=_MODEL_HELP)
    p.add_argument("--methods", default="lora,full", help="comma-separated: lora, full")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS[1:], help="the same on both engines")
    p.add_argument("--steps", type=int, default=6, help="training steps (the first is not timed)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per example")
    p.add_argument("--threads", type=int, default=None, help=_THREADS_HELP)
    p.add_argument("--rounds", type=int, default=1, help="alternating runs per engine (median reported)")
    p.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--method", choices=list(LR), help=argparse.SUPPRESS)


def add_learn(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=_MODEL_HELP)
    p.add_argument("--methods", default="lora,adapter,adapter_v2",
                   help="comma-separated fine-tuning methods (lora, qlora, adapter, adapter_v2, full)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per method")
    p.add_argument("--batch-size", type=int, default=4, help="examples per step")
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                   help="a method's learning rate (repeatable; default: the bench's rate per method)")
    p.add_argument("--threads", type=int, default=None, help=_THREADS_HELP)
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: train one method in this process


def add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=_MODEL_HELP)
    p.add_argument("--types", default=",".join(GGUF_EXPORT_TYPES),
                   help="comma-separated GGUF tensor types, from " + ", ".join(GGUF_EXPORT_TYPES))
    p.add_argument("--prompt", default="The capital of France is", help="the prompt whose greedy text is compared")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens compared")
    p.add_argument("--threads", type=int, default=None, help=_THREADS_HELP)


def add_kv_bytes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=",".join(KV_BYTES_MODELS),
                   help="comma-separated catalogue names (lucidlm models lists them)")
    p.add_argument("--tokens", type=int, default=256, help="tokens in the cache (the forward's length)")
    p.add_argument("--dtype", default="bfloat16", choices=MEASURED_DTYPES, help="the cache's dtype")


def diff_list(text: str) -> list[str]:
    """``--diffs``: names from :data:`DIFF_ROWS`, or ``none`` (an :class:`~lucidlm.errors.ExplainError`
    names anything else).

    >>> diff_list("full, lora"), diff_list("none")
    (['full', 'lora'], [])
    """
    names = [d.strip() for d in text.split(",") if d.strip()]
    if names == ["none"]:
        return []
    for name in names:
        if name not in DIFF_ROWS:
            raise ExplainError(f"--diffs: {name!r}: expected some of {', '.join(DIFF_ROWS)}, or none")
    if not names:
        raise ExplainError(f"--diffs: empty list; expected some of {', '.join(DIFF_ROWS)}, or none")
    return names


def method_list(text: str, allowed: Sequence[str], option: str = "--methods") -> list[str]:
    """A comma-separated list of explanation methods, each checked by
    :func:`lucidlm.methods.check_method` (an :class:`~lucidlm.errors.ExplainError` names the first
    one not in ``allowed``, or an empty list)."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise ExplainError(f"{option}: empty list; expected some of {', '.join(allowed)}")
    return [check_method(m, allowed, where=f" in {option}") for m in methods]


#: bench name -> (its module, one line of help, its options)
BENCHES: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None]]] = {
    "decode": ("lucidlm.bench.decode", "decode speed and memory: lucidlm vs transformers on one checkpoint",
               add_decode),
    "quant": ("lucidlm.bench.quant", "perplexity of int8 and GGUF-native (keep_quantized) weights vs float32",
              add_quant),
    "explain": ("lucidlm.bench.explain", "what an explanation costs next to a forward and a forward+backward",
                add_explain),
    "export": ("lucidlm.bench.export", "GGUF export per type: file size, time, same greedy text after reloading",
               add_export),
    "faithfulness": ("lucidlm.bench.faithfulness",
                     "deletion test: do explanations point at the tokens the prediction depends on?",
                     add_faithfulness),
    "kv": ("lucidlm.bench.kv", "what each KV-cache policy costs on real text: perplexity, memory, speed", add_kv),
    "kv-bytes": ("lucidlm.bench.kv_bytes",
                 "KV-cache bytes per token of real configs: lucidlm, transformers, full keys and values",
                 add_kv_bytes),
    "longctx": ("lucidlm.bench.longctx", "RULER-style long-context retrieval under each KV-cache policy",
                add_longctx),
    "train": ("lucidlm.bench.train", "training steps: lucidlm vs transformers+peft on one checkpoint and data",
              add_train),
    "learn": ("lucidlm.bench.learn", "fine-tuning methods side by side: steps to learn a made-up fact, tokens/s, memory",
              add_learn),
    "serve": ("lucidlm.bench.serve", "a loopback load test of lucidlm serve: requests/s, time to first token",
              add_serve),
}
