"""``lucidlm bench decode``: lucidlm vs transformers and llama.cpp on the same weights and prompts.

Rows: transformers in float32 (the reference); with ``--llama-bench PATH``, llama.cpp's
``llama-bench`` on each GGUF file (see :mod:`lucidlm.bench.llamacpp`); lucidlm in float32,
bfloat16, weight-only int8 with float32 or bfloat16 activations (``int8-float32``,
``int8-bfloat16``) and each GGUF file's blocks kept as they are (``q8_0``, ``q4_1``:
``LLM.load(file, keep_quantized=True)``), each also with decode steps through ``torch.compile``
(``+compile``, see :mod:`lucidlm.compiled`; the compilation is a warm-up, reported in its own
column) or in lucidlm's native decoder (``+native``: one C++ call per step, see
:class:`~lucidlm.compiled.NativeDecoder`). The GGUF files: ``--gguf FILE`` (repeatable), the model
itself when it is one (the embedded Q4_1 by default), and a Q8_0 export of the model made by lucidlm's own export into the
cache when no Q8_0 file is given. A file other than the model also gets a ``float32@TYPE`` row:
lucidlm on its weights dequantised to float32, the greedy reference of its ``TYPE`` row. A row
whose feature is missing, or that fails, says so in the table. Each row runs in its own
subprocess (so peak RSS is its own and one row's allocations do not slow another), rounds
alternate between rows and each cell is the median. Every child starts from a small launcher
(:mod:`lucidlm.bench.rss`): one forked from this process would start at this process's peak RSS.

Per row:

* **prefill**: tokens/s of one forward over a ``--prompt-tokens`` prompt (llama-bench: ``-p``);
* **decode**: tokens/s of greedy one-token steps with a KV cache after that prompt (a manual loop
  on both sides, so only the model and its cache are timed; llama-bench: ``-n``, from an empty
  context), also as a ratio to transformers float32 and to llama.cpp's Q8_0 row;
* **batch**: generated tokens/s for 8 prompts of different lengths generated together (left
  padding; lucidlm's ``generate_ids``, transformers' ``generate``), prefill included;
* peak RSS; for rows on a GGUF file, its size and the target ``1.2 x file + runtime``, where
  runtime is the peak RSS of a process that imported torch and lucidlm and loaded nothing
  (measured in the same run);
* the greedy tokens, compared with the float model of the same weights (transformers float32 for
  float rows, lucidlm float32 for int8 rows, ``float32@TYPE`` for a GGUF file's rows): the first
  divergence is reported.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from . import run_child
from .rss import fresh
from .args import add_decode as add_arguments  # noqa: F401  (lucidlm bench decode's options)
from .args import DECODE_ROWS

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
          "combined movable metal type, oil-based ink and a wooden press adapted from wine making. ")
REFERENCE = ("transformers", "float32")
RUNTIME = ("runtime", "torch+lucidlm")
LLAMA = "llama.cpp"
BATCH_LENGTHS = (24, 40, 56, 72, 88, 104, 120, 136)  # 8 prompts of different lengths
FILE_TYPED = ("q8_0", "q4_0", "q4_1", "q4_k", "f16", "bf16", "f32")  # lucidlm rows on a GGUF file's weights


def run(args) -> int:
    if args.engine:  # child process: measure one row, print JSON
        print(json.dumps(_measure(args)))
        return 0
    from . import emit, prepare_model, progress

    prepare_model(args.model)  # a GGUF converts here, with progress, not silently in a child
    args.files = gguf_files(args)
    rows = plan_rows(args)
    for line in _header_lines(args):
        emit(line)
    rounds = max(1, args.rounds)
    runs: dict[tuple[str, str], list[dict]] = {row: [] for row in rows}
    medians: dict[tuple[str, str], dict] = {}
    with progress(rounds * len(runs), "bench decode") as bar:
        for n in range(rounds):
            for row in runs:
                bar.set_postfix_str(f"round {n + 1}, {row[0]} {row[1]}")
                runs[row].append(_child(args, *row))
                bar.update(1)
                if n == rounds - 1:  # the row's median is final (the reference rows come first)
                    medians[row] = _median(runs[row])
                    emit(format_row(medians[row], medians))
    for line in _summary_lines(list(medians.values())):
        emit(line)
    return 0


def gguf_files(args) -> dict[str, Path]:
    """GGUF type -> file: ``--gguf`` files, the model when it is a GGUF, and (when a ``q8_0`` row or
    llama-bench wants one and none is given) lucidlm's own Q8_0 export of the model."""
    from .llamacpp import gguf_export, gguf_type

    source = model_file(args.model)
    named = [Path(f) for f in args.gguf or []] + ([source] if source else [])
    files: dict[str, Path] = {}
    for path in named:
        files.setdefault(gguf_type(path), path)
    wanted = {r.partition("+")[0] for r in args.dtypes.split(",")}
    if "q8_0" not in files and ("q8_0" in wanted or args.llama_bench):
        files["q8_0"] = gguf_export(args.model, "q8_0")
    return files


def plan_rows(args) -> list[tuple[str, str]]:
    """The rows in table order: runtime (when a GGUF file's row is measured), transformers float32,
    llama.cpp per file, the greedy references (``float32@TYPE``; lucidlm float32 for int8 rows and
    the model's own file), then ``--dtypes`` as given.

    >>> from types import SimpleNamespace as N
    >>> plan_rows(N(dtypes="float32,q8_0+compile", llama_bench="llama-bench", files={"q8_0": "x.gguf"}, model=None))
    ... # doctest: +NORMALIZE_WHITESPACE
    [('runtime', 'torch+lucidlm'), ('transformers', 'float32'), ('llama.cpp', 'q8_0'),
     ('lucidlm', 'float32@q8_0'), ('lucidlm', 'float32'), ('lucidlm', 'q8_0+compile')]
    """
    wanted = [r.strip() for r in args.dtypes.split(",") if r.strip()]
    for row in wanted:
        if row.partition("+")[0] not in DECODE_ROWS or row.partition("+")[2] not in ("", "compile", "native"):
            from ..errors import ConfigError

            raise ConfigError(f"--dtypes: {row!r}: expected rows from {', '.join(DECODE_ROWS)}, each optionally "
                              "+compile or +native")
    typed = sorted({r.partition("+")[0] for r in wanted} & set(FILE_TYPED))
    llama = [(LLAMA, t) for t in args.files] if args.llama_bench else []
    references = [("lucidlm", f"float32@{t}") for t in typed if t in args.files and not _is_model(args, t)]
    if any(r.startswith("int8-") for r in wanted) or len(references) < len(typed):  # greedy references
        references.append(("lucidlm", "float32"))
    rows = [REFERENCE, *llama, *references, *(("lucidlm", r) for r in wanted)]
    if llama or typed:
        rows.insert(0, RUNTIME)
    return list(dict.fromkeys(rows))


def _is_model(args, kind: str) -> bool:
    """Whether the ``kind`` GGUF file is the model itself (its float32 row is the reference)."""
    return model_file(args.model) == Path(args.files[kind])


def model_file(model: str | None) -> Path | None:
    """The model's GGUF file (the embedded one for None), None for another kind of model.

    >>> model_file("x/model.gguf"), model_file("org/name")
    (PosixPath('x/model.gguf'), None)
    """
    if model is None:
        from ..checkpoints.embedded import default_model_path

        return default_model_path()
    return Path(model) if Path(model).suffix == ".gguf" else None


def _median(rows: list[dict]) -> dict:
    """Median of each measurement over the rounds (the first error, if any run failed)."""
    failed = [r for r in rows if "error" in r]
    if failed:
        return failed[0]
    out = dict(rows[0])
    for key in ("prefill_tps", "decode_tps", "batch_tps", "peak_rss_mb", "warm_up_s"):
        if key in out:
            out[key] = statistics.median(r[key] for r in rows)
    return out


def _child(args, engine: str, dtype: str) -> dict:
    if engine == LLAMA:
        return _llama_row(args, dtype)
    cmd = [sys.executable, "-m", "lucidlm.cli", "bench", "decode", "--engine", engine, "--dtypes", dtype,
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    kind = dtype.partition("+")[0].partition("@")[2] or dtype.partition("+")[0]
    model = getattr(args, "files", {}).get(kind) if engine == "lucidlm" and kind in FILE_TYPED else args.model
    if engine == "lucidlm" and kind in FILE_TYPED and model is None:
        return {"engine": engine, "dtype": dtype, "error": f"no {kind} GGUF file: pass --gguf FILE"}
    if model:
        cmd += ["--model", str(model)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    row = {"engine": engine, "dtype": dtype, **run_child(fresh(cmd))}  # its peak RSS: its own
    if model and kind in FILE_TYPED:
        row["file_mb"] = Path(model).stat().st_size / 2**20
    return row


def _llama_row(args, kind: str) -> dict:
    from ..errors import LucidError
    from .llamacpp import run_llama_bench

    path = args.files[kind]
    row = {"engine": LLAMA, "dtype": kind, "file_mb": Path(path).stat().st_size / 2**20}
    try:
        return {**row, **run_llama_bench(args.llama_bench, path, args.threads or 2, args.prompt_tokens,
                                         args.new_tokens)}
    except LucidError as e:
        return {**row, "error": str(e)}


def _prompt_ids(tokenizer, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(PROMPT)
    return ids[:n]


def _measure(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.engine == RUNTIME[0]:  # the runtime alone: torch and lucidlm imported, nothing loaded
        import lucidlm.api  # noqa: F401

        return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    llm = _load(args)  # lucidlm's tokenizer and the GGUF->HF conversion serve both
    ids = _prompt_ids(llm.tokenizer, args.prompt_tokens)
    batch = [_prompt_ids(llm.tokenizer, n) for n in BATCH_LENGTHS]
    engine = (_Lucidlm(llm, args.dtypes, len(ids) + args.new_tokens) if args.engine == "lucidlm"
              else _Transformers(llm, args.dtypes))
    with torch.inference_mode():
        w0 = time.perf_counter()
        engine.prefill(ids[:16])  # warm-up (first-call allocations, thread pools)
        engine.warm_up(batch)
        warm_up_s = time.perf_counter() - w0
        t0 = time.perf_counter()
        logits = engine.prefill(ids)
        t1 = time.perf_counter()
        tokens = []
        for _ in range(args.new_tokens):
            token = int(logits.argmax(-1))
            tokens.append(token)
            logits = engine.step(token)
        t2 = time.perf_counter()
        generated = engine.batch(batch, args.new_tokens // 2)
        t3 = time.perf_counter()
    return {"prefill_tps": len(ids) / (t1 - t0), "decode_tps": args.new_tokens / (t2 - t1),
            "batch_tps": generated / (t3 - t2), "tokens": tokens, "warm_up_s": warm_up_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _load(args):
    """The child's model: a GGUF file's blocks kept as they are for a ``q8_0``/``q4_1``/... row,
    else the float model (converted by the transformers row itself)."""
    import inspect

    from ..api import LLM
    from ..errors import ConfigError

    kind = args.dtypes.partition("+")[0]
    if args.engine == "lucidlm" and kind in FILE_TYPED:
        if "keep_quantized" not in inspect.signature(LLM.load).parameters:
            raise ConfigError(f"{kind}: this lucidlm has no LLM.load(keep_quantized=True) (GGUF blocks kept as "
                              "they are, issue 29)")
        return LLM.load(args.model, progress=False, keep_quantized=True)
    return LLM.load(args.model, progress=False)


class _Lucidlm:
    def __init__(self, llm, dtype: str, tokens: int) -> None:
        from ..compiled import CompiledDecoder, NativeDecoder
        from ..generate import decode_step

        dtype, _, compile_ = dtype.partition("+")
        dtype = dtype.partition("@")[0]  # float32@q8_0: the q8_0 file's weights in float32
        if dtype.startswith("int8-"):  # int8 weights, float32 or bfloat16 activations
            llm.model.to(getattr(torch, dtype.removeprefix("int8-")))
            llm.quantize("int8")
        elif dtype not in FILE_TYPED:  # a GGUF file's kept blocks: as LLM.load left them
            llm.model.to(getattr(torch, dtype))
        self.model, self.cache = llm.model, None
        self.dtype = next((p.dtype for p in llm.model.parameters() if p.is_floating_point()), torch.float32)
        decoders = {"compile": CompiledDecoder, "native": NativeDecoder}
        self.decoder = decoders[compile_](self.model) if compile_ else None
        self.step_fn = self.decoder or decode_step
        # one cache size for the warm-up and the timed run (a compiled graph is per capacity)
        self.capacity = self.decoder.capacity(tokens, self.model.config.block_size) if self.decoder else tokens + 1024

    def prefill(self, ids: list[int]) -> torch.Tensor:
        from ..cache import build_cache

        self.cache = build_cache(self.model.config, 1, "dense", self.capacity, dtype=self.dtype)
        logits = self.model(torch.tensor([ids]), cache=self.cache, last_only=True)[0, -1]
        self.position = len(ids)
        if self.decoder is not None:
            self.decoder.prepare(self.cache)
        return logits

    def warm_up(self, prompts: list[list[int]]) -> None:
        if self.decoder is not None:  # compile the graphs the timed run uses (batch 1 and 8)
            self.step(0)
            self.batch(prompts, 2)

    def step(self, token: int) -> torch.Tensor:
        logits = self.step_fn(torch.tensor([[token]]), torch.tensor([[self.position]]), self.cache, self.model)
        self.position += 1
        return logits[0]

    def batch(self, prompts: list[list[int]], new_tokens: int) -> int:
        from ..generate import generate_ids

        steps = generate_ids(self.model, prompts, new_tokens, decoder=self.decoder)
        return sum(t is not None for step in steps for t in step)


class _Transformers:
    def __init__(self, llm, dtype: str) -> None:
        import transformers

        source = Path(llm.source)
        if source.suffix == ".gguf":  # transformers' own GGUF reader: an independent path to the weights
            model = transformers.AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                                      dtype=getattr(torch, dtype))
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype))
        self.model, self.past = model.eval(), None

    def warm_up(self, prompts: list[list[int]]) -> None:
        pass

    def prefill(self, ids: list[int]) -> torch.Tensor:
        out = self.model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        self.past = out.past_key_values
        return out.logits[0, -1]

    def step(self, token: int) -> torch.Tensor:
        out = self.model(torch.tensor([[token]]), past_key_values=self.past, use_cache=True, logits_to_keep=1)
        self.past = out.past_key_values
        return out.logits[0, -1]

    def batch(self, prompts: list[list[int]], new_tokens: int) -> int:
        longest = max(map(len, prompts))
        ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
        out = self.model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, pad_token_id=0)
        return (out.shape[1] - longest) * len(prompts)


def format_table(rows: list[dict], args) -> str:
    """The whole table; ``run`` prints the same lines as they become known.

    >>> from types import SimpleNamespace as N
    >>> ref = dict(engine="transformers", dtype="float32", prefill_tps=200.0, decode_tps=10.0, batch_tps=40.0,
    ...            peak_rss_mb=1600.0, tokens=[1, 2, 3], warm_up_s=0.5)
    >>> runtime = dict(engine="runtime", dtype="torch+lucidlm", peak_rss_mb=300.0)
    >>> llama = dict(engine="llama.cpp", dtype="q8_0", prefill_tps=400.0, decode_tps=20.0, peak_rss_mb=200.0,
    ...              file_mb=138.0)
    >>> f32 = dict(ref, engine="lucidlm", dtype="float32@q8_0", tokens=[1, 2, 4])
    >>> ours = dict(ref, engine="lucidlm", dtype="q8_0", decode_tps=30.0, peak_rss_mb=450.0, file_mb=138.0)
    >>> args = N(model=None, prompt_tokens=512, new_tokens=3, threads=2, rounds=1, llama_bench=None)
    >>> print("\\n".join(format_table([runtime, ref, llama, f32, ours], args).splitlines()[3:]))
    ... # doctest: +NORMALIZE_WHITESPACE
    runtime       torch+lucidlm             -             -          -         -         -           -       300      -                 -          -  (imported torch and lucidlm, loaded nothing)
    transformers  float32               200.0          10.0      1.00x     0.50x     0.50x        40.0      1600      -                 -        0.5  same as transformers float32
    llama.cpp     q8_0                  400.0          20.0      2.00x     1.00x     1.00x           -       200    138    200 <= 466 yes          -  -
    lucidlm       float32@q8_0          200.0          10.0      1.00x     0.50x     0.50x        40.0      1600      -                 -        0.5  diverges at 2 from transformers float32
    lucidlm       q8_0                  200.0          30.0      3.00x     1.50x     0.50x        40.0       450    138    450 <= 466 yes        0.5  diverges at 2 from lucidlm float32@q8_0
    fastest lucidlm decode: q8_0, 1.50x llama.cpp Q8_0 (target >= 1.0x); prefill 0.50x (target >= 0.8x)
    """
    by = {(r["engine"], r["dtype"]): r for r in rows}
    return "\n".join([*_header_lines(args), *(format_row(r, by) for r in rows), *_summary_lines(rows)])


def _header_lines(args) -> list[str]:
    llama = f", llama.cpp: {args.llama_bench}" if getattr(args, "llama_bench", None) else ""
    return [f"decode benchmark: {args.model or 'embedded SmolLM2-135M-Instruct'}, {args.prompt_tokens} prompt "
            f"tokens, {args.new_tokens} greedy new tokens, batch = 8 prompts of {BATCH_LENGTHS[0]}-"
            f"{BATCH_LENGTHS[-1]} tokens x {args.new_tokens // 2} new, threads "
            f"{args.threads or torch.get_num_threads()}, median of {max(1, args.rounds)} alternating rounds{llama}",
            f"{'engine':<14}{'weights':<14}{'prefill tok/s':>13}{'decode tok/s':>14}{'vs HF fp32':>11}"
            f"{'dec/llama':>10}{'pf/llama':>10}{'batch tok/s':>12}{'peak RSS':>10}"
            f"{'file':>7}{'RSS<=1.2file+rt':>18}{'warm-up s':>11}  greedy vs the float model of the same weights",
            "(dec/llama, pf/llama: decode, prefill tokens/s over llama.cpp's Q8_0 row; RSS and file in MiB; "
            "rt: the runtime row)"]


def _cell(r: dict, key: str, width: int, fmt: str) -> str:
    return f"{r[key]:>{width}{fmt}}" if key in r else f"{'-':>{width}}"


def _ratio(r: dict, other: dict | None, key: str, width: int) -> str:
    if other is None or key not in r or key not in other:
        return f"{'-':>{width}}"
    return f"{r[key] / other[key]:>{width - 1}.2f}x"


def format_row(r: dict, by: dict) -> str:
    """One row; ``by``: the rows measured so far by ``(engine, dtype)`` (the references among them)."""
    if "error" in r:
        return f"{r['engine']:<14}{r['dtype']:<14}  failed: {r['error']}"
    llama = by.get((LLAMA, "q8_0"))
    return (f"{r['engine']:<14}{r['dtype']:<14}{_cell(r, 'prefill_tps', 13, '.1f')}{_cell(r, 'decode_tps', 14, '.1f')}"
            f"{_ratio(r, by.get(REFERENCE), 'decode_tps', 11)}{_ratio(r, llama, 'decode_tps', 10)}"
            f"{_ratio(r, llama, 'prefill_tps', 10)}{_cell(r, 'batch_tps', 12, '.1f')}"
            f"{_cell(r, 'peak_rss_mb', 10, '.0f')}{_cell(r, 'file_mb', 7, '.0f')}{_rss_target(r, by.get(RUNTIME))}"
            f"{_cell(r, 'warm_up_s', 11, '.1f')}  {_agreement(r, by)}")


def _rss_target(r: dict, runtime: dict | None) -> str:
    """Peak RSS against 1.2 x the GGUF file + the runtime's RSS (rows on a GGUF file)."""
    if "file_mb" not in r or runtime is None or "peak_rss_mb" not in runtime:
        return f"{'-':>18}"
    target = 1.2 * r["file_mb"] + runtime["peak_rss_mb"]
    return f"{r['peak_rss_mb']:>7.0f} <= {target:.0f} {'yes' if r['peak_rss_mb'] <= target else 'no'}".rjust(18)


def greedy_reference(engine: str, dtype: str) -> tuple[str, str]:
    """The row whose greedy tokens a row's are compared with: the float model of the same weights.

    >>> greedy_reference("lucidlm", "int8-bfloat16+compile"), greedy_reference("lucidlm", "q4_1")
    (('lucidlm', 'float32'), ('lucidlm', 'float32@q4_1'))
    """
    kind = dtype.partition("+")[0]
    if engine == "lucidlm" and kind.startswith("int8-"):
        return ("lucidlm", "float32")
    if engine == "lucidlm" and kind in FILE_TYPED:
        return ("lucidlm", f"float32@{kind}")
    return REFERENCE


def _agreement(r: dict, by: dict) -> str:
    if r["engine"] == RUNTIME[0]:
        return "(imported torch and lucidlm, loaded nothing)"
    if "tokens" not in r:
        return "-"
    name = greedy_reference(r["engine"], r["dtype"])
    reference = by.get(name)
    if reference is None and name[1].startswith("float32@"):  # the model's own file: its float32 row
        name = ("lucidlm", "float32")
        reference = by.get(name)
    if reference is None or "tokens" not in reference:
        return "?"
    first = next((i for i, (a, b) in enumerate(zip(r["tokens"], reference["tokens"])) if a != b), None)
    return f"same as {' '.join(name)}" if first is None else f"diverges at {first} from {' '.join(name)}"


def _summary_lines(rows: list[dict]) -> list[str]:
    by = {(r["engine"], r["dtype"]): r for r in rows if "decode_tps" in r}
    lines = []
    for dtype in ("float32", "bfloat16", "float32+compile", "bfloat16+compile"):  # int8: no HF row
        ours, theirs = by.get(("lucidlm", dtype)), by.get(("transformers", dtype.partition("+")[0]))
        if ours and theirs:
            lines.append(f"{dtype}: decode {ours['decode_tps'] / theirs['decode_tps']:.2f}x, prefill "
                         f"{ours['prefill_tps'] / theirs['prefill_tps']:.2f}x, batch "
                         f"{ours['batch_tps'] / theirs['batch_tps']:.2f}x transformers in the same dtype")
    llama = by.get((LLAMA, "q8_0"))
    ours = [r for (engine, dtype), r in by.items() if engine == "lucidlm" and "@" not in dtype]
    if llama and ours:
        best = max(ours, key=lambda r: r["decode_tps"])
        lines.append(f"fastest lucidlm decode: {best['dtype']}, {best['decode_tps'] / llama['decode_tps']:.2f}x "
                     f"llama.cpp Q8_0 (target >= 1.0x); prefill {best['prefill_tps'] / llama['prefill_tps']:.2f}x "
                     "(target >= 0.8x)")
    return lines
