"""llama.cpp beside lucidlm in ``lucidlm bench decode --llama-bench PATH``: run its ``llama-bench``
on a GGUF file and read its JSON report, and name the files the bench compares on.

``llama-bench -m FILE -t THREADS -p PROMPT -n NEW -d 0,PROMPT -o json`` prints a JSON list with one
entry per test and context depth: the prefill test (``n_prompt`` > 0, ``n_gen`` 0) and the decode test
(``n_gen`` > 0, ``n_prompt`` 0), each from an empty context (``n_depth`` 0) and after ``PROMPT``
tokens; ``avg_ts`` is the mean tokens/s over its repetitions. The bench takes prefill from an empty
context and decode after the prompt, as lucidlm's rows decode after their prompt: decoding reads the
KV cache too, so a decode from an empty context would be the faster, unlike, number (llama.cpp's
Q8_0 on 2 cores: 79 tokens/s from an empty context, 60 after 512 tokens). A report without
``n_depth`` (an older llama-bench) is read as before. llama-bench reports no
memory: its peak RSS is measured by a small launcher (:mod:`lucidlm.bench.rss`: a child started
straight from this process would inherit this process's peak).

>>> report = [{"model_type": "llama 256M Q8_0", "model_size": 143025408, "n_threads": 2,
...            "n_prompt": 512, "n_gen": 0, "avg_ts": 650.5},
...           {"model_type": "llama 256M Q8_0", "model_size": 143025408, "n_threads": 2,
...            "n_prompt": 0, "n_gen": 64, "avg_ts": 140.25}]
>>> parse_llama_bench(json.dumps(report))
{'prefill_tps': 650.5, 'decode_tps': 140.25, 'model_type': 'llama 256M Q8_0', 'threads': 2}
>>> deeper = {**report[1], "n_depth": 512, "avg_ts": 101.5}
>>> parse_llama_bench(json.dumps(report + [deeper]), decode_depth=512)["decode_tps"]
101.5
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from ..errors import ConfigError
from .rss import fresh, peak_from_stderr


def parse_llama_bench(text: str, decode_depth: int = 0) -> dict:
    """Prefill (from an empty context) and decode tokens/s (after ``decode_depth`` tokens, when the
    report has that depth), the model type and threads, from ``llama-bench -o json``'s stdout.
    Raises :class:`~lucidlm.errors.ConfigError` for output that is not such a report."""
    try:
        tests = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"llama-bench: expected its JSON report (-o json) on stdout, got {text[:80]!r}") from e
    if not isinstance(tests, list) or not all(isinstance(t, dict) for t in tests):
        raise ConfigError("llama-bench: expected a JSON list of tests (-o json)")
    prefill = [t for t in tests if t.get("n_prompt", 0) > 0 and t.get("n_gen", 0) == 0 and not t.get("n_depth")]
    decode = [t for t in tests if t.get("n_gen", 0) > 0 and t.get("n_prompt", 0) == 0]
    deep = [t for t in decode if t.get("n_depth", 0) == decode_depth]
    decode = deep or decode
    if not prefill or not decode:
        raise ConfigError("llama-bench: the report lacks a prefill test (-p N) or a decode test (-n N)")
    return {"prefill_tps": float(prefill[0]["avg_ts"]), "decode_tps": float(decode[0]["avg_ts"]),
            "model_type": prefill[0].get("model_type", "?"), "threads": prefill[0].get("n_threads")}


def llama_bench_command(binary: str | Path, gguf: str | Path, threads: int, prompt_tokens: int,
                        new_tokens: int, repetitions: int = 1) -> list[str]:
    """The command line of one llama-bench run.

    >>> " ".join(llama_bench_command("llama-bench", "m.gguf", 2, 512, 64))
    'llama-bench -m m.gguf -t 2 -p 512 -n 64 -d 0,512 -r 1 -o json'
    """
    return [str(binary), "-m", str(gguf), "-t", str(threads), "-p", str(prompt_tokens), "-n", str(new_tokens),
            "-d", f"0,{prompt_tokens}", "-r", str(repetitions), "-o", "json"]


def run_llama_bench(binary: str | Path, gguf: str | Path, threads: int, prompt_tokens: int,
                    new_tokens: int, repetitions: int = 1) -> dict:
    """Run llama-bench once: its parsed report plus ``peak_rss_mb`` (the child's own peak). A run
    that fails raises :class:`~lucidlm.errors.ConfigError` with its last stderr line."""
    if not Path(binary).is_file():
        raise ConfigError(f"--llama-bench {binary}: no such file (expected llama.cpp's llama-bench binary)")
    command = llama_bench_command(binary, gguf, threads, prompt_tokens, new_tokens, repetitions)
    done = subprocess.run(fresh(command), capture_output=True, text=True)
    stderr, peak_mb = peak_from_stderr(done.stderr)
    if done.returncode != 0:
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"llama-bench failed (exit {done.returncode}) on {gguf}: {last}")
    return {**parse_llama_bench(done.stdout, decode_depth=prompt_tokens), "peak_rss_mb": peak_mb}


def gguf_type(path: str | Path) -> str:
    """A GGUF file's weight type from its ``general.file_type``, lower case as llama.cpp's
    quantize names it (``q8_0``, ``q4_1``, ``f16``, ...); ``unknown`` when the key is absent."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("general.file_type")
    if field is None:
        return "unknown"
    name = gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name
    return name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


def gguf_export(model: str | None, kind: str = "q8_0") -> Path:
    """A ``kind`` (q8_0, q4_0, ...) GGUF of ``model`` (None: the embedded default) written by
    lucidlm's own export (:meth:`lucidlm.LLM.export_gguf`, from the float32 model) into lucidlm's
    cache once, named by the source's fingerprint; later calls find it there."""
    from ..api import LLM
    from ..checkpoints import checkpoint_dir
    from ..checkpoints.conversion_cache import fingerprint
    from ..fileio import cache_root

    source, _ = checkpoint_dir(model, progress=True)
    key = (fingerprint(source) if Path(source).is_file() else None) or hashlib.sha256(str(source).encode()).hexdigest()
    target = cache_root() / "bench" / f"{Path(source).stem}-{key[:16]}-{kind}.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        LLM.load(model, progress=True).export_gguf(target, type=kind, progress=True)  # written atomically
    return target
