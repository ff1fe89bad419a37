"""Explain every record of a dataset: :func:`explain_dataset` and ``lucidlm explain-dataset``.

Each record holds a ``prompt`` (text, or token ids) or chat ``messages`` (rendered with the
tokenizer's chat template and its generation prompt), an optional target (under ``target``, or
the field ``target_field`` names: a token's text, a token id, or a multi-token continuation) and
an optional ``id`` (default: the record's 0-based index). Every record is checked before any work
starts; a bad one is a :class:`~lucidlm.errors.DataError` naming ``file:line``.

Output: ``DIR/shard-00000.jsonl`` (or ``.parquet``) ..., one row per record (:data:`ROW_FIELDS`),
shard ``s`` holding records ``[s * shard_size, (s + 1) * shard_size)``. Shards are written
atomically, so a shard file is always complete: a rerun after a kill redoes only the missing
shards. Records are batched (:func:`~lucidlm.explain.batch.explain_batch`) within a shard only,
always in the same batches, so the files do not depend on how many processes wrote them: under
``torchrun --nproc-per-node N`` rank ``r`` writes the shards ``s`` with ``s % N == r``, and the
files are byte-identical to a one-process run's (on the same hardware and thread count).
``DIR/run.json`` records the settings when the run starts (a rerun with other settings is
refused), ``DIR/manifest.json`` the shards when it ends; :func:`read_results` reads the rows back
in record order (the files: :mod:`lucidlm.explain.shards`).

**Diffs** (``diff_against=base``, ``lucidlm explain-dataset --diff-against BASE``): each record is
explained by both models as an :class:`~lucidlm.explain.diff.ExplanationDiff` (the run's model is
the tuned one: a tuned checkpoint, or the base with ``adapter=``), one row per record
(:data:`DIFF_ROW_FIELDS`: ``id``, then the diff's wire form, with both models' latent relevances,
which ``lucidlm diff-report`` ranks components by: of every layer by default, about 2 MB of JSON a
record for SmolLM2-135M's 30 layers of 1536 neurons; ``layers=`` chooses fewer, ``None`` none).
Diffs are made one record at a time (no batches) and written as JSONL only (a row nests two
explanations); sharding, resuming and ``torchrun`` are as above, and ``run.json`` names the base
(and a fingerprint of the tuned model's adapter weights), so a resume against another base or
adapter is refused.

The command is :mod:`lucidlm.commands.explain_dataset`; module import is torch-free (the command's
help names :data:`FORMATS` before anything loads).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError, ExplainError
from ..methods import METHODS, check_method
from .shards import MANIFEST, RUN_FILE, is_complete, pyarrow_module, read_results, write_shard  # noqa: F401  (read_results: public here)

FORMATS = ("jsonl", "parquet")
#: the fields of every output row: the record's ``id``, then the explanation's wire form
#: (:meth:`~lucidlm.explain.explanation.Explanation.to_dict`; README, "Wire format")
ROW_FIELDS = ("id", "format", "version", "type", "tokens", "token_ids", "relevance", "target", "target_ids",
              "target_logit", "method", "evicted", "layers", "prompt", "score_label", "segments")
#: the fields of every output row of a diff run: the record's ``id``, then the diff's wire form
#: (:meth:`~lucidlm.explain.diff.ExplanationDiff.to_dict`)
DIFF_ROW_FIELDS = ("id", "format", "version", "type", "base", "tuned", "relevance", "logit_delta",
                   "adapter_relevance")
#: what a resumed run must share with the run that started ``DIR`` (``adapter``: a fingerprint of
#: the model's LoRA weights; ``diff_against``: the base of a diff run, else None)
SETTINGS = ("method", "model", "dtype", "format", "shard_size", "batch_size", "target_field", "kv_cache",
            "cache_tokens", "adapter", "diff_against", "layers")
#: the method of a run that names none: diffs default to cp-lrp, as :func:`~lucidlm.explain.diff.explain_diff`
DEFAULT_METHOD, DEFAULT_DIFF_METHOD = "attnlrp", "cp-lrp"


@dataclasses.dataclass(frozen=True)
class Item:
    """One checked record: its index, id, where it came from, and what to explain."""

    index: int
    id: int | str
    source: str
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    target: Any = None


@dataclasses.dataclass(frozen=True)
class DatasetRun:
    """What :func:`explain_dataset` did: ``records`` in ``out`` (``computed`` of them by this run,
    over all processes; the others were in shards an earlier run had written), in ``seconds``."""

    out: Path
    records: int
    computed: int
    seconds: float
    shards: list[str]
    is_main: bool = True
    against: str | None = None  # the base of a diff run

    def summary(self, method: str, fmt: str) -> str:
        rate = self.computed / self.seconds if self.seconds > 0 else 0.0
        what = f"explained {self.records} records" + (f" as diffs against {self.against}" if self.against else "")
        return (f"{what} with {method} ({self.computed} now, {self.records - self.computed} "
                f"from an earlier run) in {self.seconds:.1f} s, {rate:.2f} records/s; wrote {self.out} "
                f"({len(self.shards)} {fmt} shards, {MANIFEST})")


# ----------------------------------------------------------------------------- reading records
def read_items(data: str | Path | Iterable[dict], target_field: str = "target", limit: int | None = None,
               where: str | None = None) -> list[Item]:
    """Check every record of a JSONL file (or an iterable of dicts, e.g. a ``datasets.Dataset``)
    and return the first ``limit`` of them as :class:`Item` s; ``where`` prefixes error messages.

    >>> [i.id for i in read_items([{"prompt": "a"}, {"messages": [{"role": "user", "content": "b"}], "id": "x"}])]
    [0, 'x']
    >>> read_items([{"text": "a"}])
    Traceback (most recent call last):
    ...
    lucidlm.errors.DataError: record 0: no 'prompt' (text or token ids) or 'messages' (a chat) to explain
    """
    from ..records import read_records

    if not isinstance(data, (str, Path)):
        data = list(data if limit is None else (row for _, row in zip(range(limit), data)))
    try:
        records = read_records(data)[:limit]
        return [_item(n, r.data, r.source, target_field) for n, r in enumerate(records)]
    except DataError as exc:
        raise DataError(f"{where}: {exc}" if where else str(exc)) from None


def _item(index: int, record: dict, source: str, target_field: str) -> Item:
    prompt, messages = record.get("prompt"), record.get("messages")
    if prompt is None and messages is None:
        raise DataError(f"{source}: no 'prompt' (text or token ids) or 'messages' (a chat) to explain")
    if prompt is not None and messages is not None:
        raise DataError(f"{source}: both 'prompt' and 'messages': expected one of them")
    if prompt is not None and not (isinstance(prompt, str) and prompt or _ids(prompt)):
        raise DataError(f"{source}: 'prompt' must be non-empty text or a list of token ids, got {prompt!r}")
    if messages is not None and not (isinstance(messages, list) and messages
                                     and all(isinstance(m, dict) and "role" in m for m in messages)):
        raise DataError(f"{source}: 'messages' must be a non-empty list of {{'role': ..., 'content': ...}} dicts")
    target = record.get(target_field)
    if not (target is None or (isinstance(target, str) and target) or _is_id(target) or _ids(target)):
        raise DataError(f"{source}: {target_field!r} must be a token's text, a token id or a list of token ids "
                        f"(a continuation), got {target!r}")
    ident = record.get("id", index)
    if not (isinstance(ident, str) or _is_id(ident)):
        raise DataError(f"{source}: 'id' must be a string or an integer, got {ident!r}")
    return Item(index, ident, source, prompt, messages, target)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_id(v) for v in value)


def load_hf_dataset(name: str, split: str = "train"):
    """A Hugging Face dataset from a local source only (``HF_DATASETS_OFFLINE=1`` semantics): a
    directory written by ``save_to_disk``, a local dataset directory, or a name already in the
    local cache. Nothing is downloaded."""
    try:
        import datasets
    except ImportError:
        raise DataError("--hf-dataset needs the 'datasets' package: pip install datasets") from None
    path = Path(name).expanduser()
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"--hf-dataset {name}: no split {split!r} (it has {', '.join(loaded)})")
            loaded = loaded[split]
        return loaded
    offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True  # for this call only: a name resolves from the cache, never the hub
    try:
        return datasets.load_dataset(str(path) if path.exists() else name, split=split)
    except (OSError, ValueError) as exc:  # not found / not cached (FileNotFoundError, ConnectionError), bad split
        raise DataError(f"--hf-dataset {name} (split {split!r}): not a local dataset directory, nor in the local "
                        f"Hugging Face cache ({type(exc).__name__}: {exc})") from None
    finally:
        datasets.config.HF_HUB_OFFLINE = offline


# ----------------------------------------------------------------------------- explaining
def explain_dataset(llm, data: str | Path | Iterable[dict] | Sequence[Item], out: str | Path,
                    method: str | None = None, batch_size: int = 8, target_field: str = "target",
                    kv_cache: str | None = None, cache_tokens: int | None = None, format: str = "jsonl",
                    shard_size: int = 1000, limit: int | None = None, progress: bool = False,
                    diff_against=None, layers: str | Sequence[int] | None = "auto") -> DatasetRun:
    """Explain every record of ``data`` (see the module docstring) into the directory ``out``.

    ``method``: default ``"attnlrp"``, or ``"cp-lrp"`` for diffs. ``diff_against``: a base ``LLM``
    of the same architecture and vocabulary: each record becomes the diff of ``llm`` (the tuned
    model) against it, explained one record at a time (``batch_size`` does not apply; ``kv_cache``
    and ``format="parquet"`` are refused). ``layers``: whose latent relevances each row holds
    (``"all"``, layer indices, or ``None``); ``"auto"`` (default): none for explanations, all for diffs.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process calls this; the process group is joined
    here (gloo on CPU, nccl on CUDA) and left to the caller to close
    (:func:`lucidlm.distributed.shutdown`). ``progress``: a records/s bar on stderr (rank 0). The
    shards are spread over the processes, unless ``llm`` is tensor-parallel
    (``LLM.load(..., tensor_parallel=True)``): then every process explains every shard together and
    the first one writes them.

    >>> import tempfile
    >>> from lucidlm import LLM, Config, GPT
    >>> llm = LLM(GPT(Config.from_name("tiny-llama")).eval())
    >>> out = tempfile.mkdtemp()
    >>> explain_dataset(llm, [{"prompt": [1, 5, 7]}, {"prompt": [2, 3], "target": 9}], out).records
    2
    >>> [(row["id"], row["target_ids"], len(row["relevance"])) for row in read_results(out)][1]
    (1, [9], 2)
    >>> base = LLM(GPT(Config.from_name("tiny-llama")).eval())
    >>> run = explain_dataset(llm, [{"prompt": [1, 5, 7]}], tempfile.mkdtemp(), diff_against=base)
    >>> [(row["type"], len(row["relevance"])) for row in read_results(run.out)]
    [('ExplanationDiff', 3)]
    """
    from ..distributed import World, all_sum, barrier, setup
    from ..model.parallel import shard_of

    method = method or (DEFAULT_METHOD if diff_against is None else DEFAULT_DIFF_METHOD)
    settings = _settings(llm, method, batch_size, target_field, kv_cache, cache_tokens, format, shard_size,
                         diff_against, layers)
    items = list(data)[:limit] if _is_items(data) else read_items(data, target_field, limit)
    _check_ids(items, llm.config.vocab_size)
    world = setup()
    # a tensor-parallel model is one model over every process: each explains every shard, the first writes
    parallel = shard_of(llm.model) is not None
    shards_world = World() if parallel else world
    if world.size > 1:
        for model in (llm, diff_against):
            if model is not None:
                model.model.to(world.device)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    _check_resume(out, settings, write=world.is_main)
    barrier(world)
    start = time.perf_counter()
    shards = _shards(items, shard_size)
    mine = [s for s in range(len(shards)) if s % shards_world.size == shards_world.rank]
    todo = [s for s in mine if not is_complete(_shard_path(out, s, format), len(shards[s]), format)]
    computed = _explain_shards(llm, [(s, shards[s]) for s in todo], out, settings, items,
                               progress and world.is_main, diff_against,
                               write=world.is_main or not parallel)
    barrier(world)
    computed = int(all_sum(float(computed), shards_world, world.device))
    names = [_shard_path(out, s, format).name for s in range(len(shards))]
    if world.is_main:
        _write_manifest(out, settings, shards, names)
    return DatasetRun(out, len(items), computed, time.perf_counter() - start, names, world.is_main,
                      settings["diff_against"])


def _is_items(data: Any) -> bool:
    return isinstance(data, Sequence) and not isinstance(data, str) and bool(data) and isinstance(data[0], Item)


def _settings(llm, method: str, batch_size: int, target_field: str, kv_cache: str | None, cache_tokens: int | None,
              fmt: str, shard_size: int, base=None, layers: Any = "auto") -> dict[str, Any]:
    """The run's settings, checked (ExplainError naming the argument) before any work."""
    check_method(method, METHODS)
    if fmt not in FORMATS:
        raise ExplainError(f"format={fmt!r}: expected one of {', '.join(FORMATS)}")
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if not isinstance(value, int) or value < 1:
            raise ExplainError(f"{name}={value!r}: expected a positive integer")
    if base is not None:
        check_diff_options(fmt, kv_cache)
        from .diff import check_comparable

        check_comparable(llm.model, base.model, llm.tokenizer, base.tokenizer)
    if fmt == "parquet":
        pyarrow_module()
    dtype = str(next(llm.model.parameters()).dtype).removeprefix("torch.")
    return {"method": method, "model": model_id(llm), "dtype": dtype, "format": fmt, "shard_size": shard_size,
            "batch_size": batch_size, "target_field": target_field, "kv_cache": kv_cache, "cache_tokens": cache_tokens,
            "adapter": adapter_id(llm.model), "diff_against": None if base is None else _identity(base),
            "layers": _layers(llm, layers, base is not None)}


def _layers(llm, layers: Any, diff: bool) -> str | list[int] | None:
    """``layers`` checked against the model: ``"all"``, sorted layer indices, or None (an empty
    selection records none); ``"auto"``: all for a diff, none for an explanation."""
    from .latent import select_layers

    if layers == "auto":
        return "all" if diff else None
    chosen = select_layers(llm.config.n_layer, layers)
    return "all" if layers == "all" else (chosen or None)


def check_diff_options(fmt: str, kv_cache: str | None) -> None:
    """What a diff run cannot do (torch-free: the command checks it before loading a model).

    >>> check_diff_options("parquet", None)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lucidlm.errors.ExplainError: format='parquet' with diff_against: a diff row nests two explanations; ...
    """
    if fmt != "jsonl":
        raise ExplainError(f"format={fmt!r} with diff_against: a diff row nests two explanations; "
                           "write JSONL (format='jsonl')")
    if kv_cache is not None:
        raise ExplainError(f"kv_cache={kv_cache!r} with diff_against: a diff explains both models' dense "
                           "forward; leave kv_cache out")


def adapter_id(model) -> str | None:
    """A fingerprint of ``model``'s LoRA weights (names and bytes: the first 16 hex digits of their
    SHA-256), or None without LoRA layers: run.json tells adapters apart without their directory."""
    import hashlib

    import torch

    digest, found = hashlib.sha256(), False
    for name, p in sorted(model.named_parameters()):
        if "lora_" in name:
            found = True
            digest.update(name.encode())
            digest.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16] if found else None


def _identity(llm) -> str:
    """How run.json names a diff's base: :func:`model_id`, plus its adapter's fingerprint if any."""
    adapter = adapter_id(llm.model)
    return model_id(llm) + (f" + adapter {adapter}" if adapter else "")


def model_id(llm) -> str:
    """How run.json and the manifest name the model, in a form ``--model`` takes back: a hub repo id,
    the embedded default's name, or the checkpoint's absolute path.

    >>> from lucidlm import LLM, Config, GPT
    >>> model_id(LLM(GPT(Config.from_name("tiny-llama")), source="ckpt/run-3")) == str(Path("ckpt/run-3").resolve())
    True
    """
    from ..checkpoints.embedded import FILENAME

    name = llm.name
    if not llm.source or "/" in name or name == FILENAME.partition(".")[0]:  # a folder name has no "/"
        return name
    return str(Path(llm.source).expanduser().resolve())


def _check_ids(items: Sequence[Item], vocab_size: int) -> None:
    """Token ids in prompts and targets must exist in the vocabulary (checked before any work)."""
    for item in items:
        for what, value in (("prompt", item.prompt), ("target", item.target)):
            ids = [value] if _is_id(value) else value if isinstance(value, list) else []
            bad = [i for i in ids if i >= vocab_size]
            if bad:
                raise DataError(f"{item.source}: {what} token id {bad[0]} is out of range: the vocabulary has "
                                f"{vocab_size} tokens")


def _shards(items: Sequence[Item], shard_size: int) -> list[Sequence[Item]]:
    return [items[lo:lo + shard_size] for lo in range(0, len(items), shard_size)]


def _shard_path(out: Path, shard: int, fmt: str) -> Path:
    return out / f"shard-{shard:05d}.{fmt}"


def _explain_shards(llm, todo: list[tuple[int, Sequence[Item]]], out: Path, settings: dict, items: Sequence[Item],
                    show: bool, base=None, write: bool = True) -> int:
    """Explain (or diff against ``base``) and write each shard (``write``: this process writes);
    returns the number of records done."""
    bar = _bar(sum(len(shard) for _, shard in todo), show)
    id_kind = "str" if any(isinstance(item.id, str) for item in items) else "int"
    try:
        for s, shard in todo:
            if base is None:
                rows = explain_shard(llm, shard, settings["method"], settings["batch_size"], settings["kv_cache"],
                                     settings["cache_tokens"], bar, settings["layers"])
            else:
                rows = diff_shard(llm, base, shard, settings["method"], bar, settings["layers"])
            if write:
                write_shard(_shard_path(out, s, settings["format"]), rows, settings["format"], id_kind)
    finally:
        bar.close()
    return sum(len(shard) for _, shard in todo)


def explain_shard(llm, items: Sequence[Item], method: str = "attnlrp", batch_size: int = 8,
                  kv_cache: str | None = None, cache_tokens: int | None = None, bar=None,
                  layers: str | Sequence[int] | None = None) -> list[dict]:
    """The output rows of ``items``, in their order. Batches are formed by prompt length (fewer
    padding tokens), a function of ``items`` alone, so the same items always batch the same way.

    >>> from lucidlm import LLM, Config, GPT
    >>> llm = LLM(GPT(Config.from_name("tiny-llama")).eval())
    >>> [r["token_ids"] for r in explain_shard(llm, read_items([{"prompt": [4, 2]}, {"prompt": [7]}]))]
    [[4, 2], [7]]
    """
    from .batch import explain_batch

    ids = [_prompt_ids(llm.tokenizer, item) for item in items]
    order = sorted(range(len(items)), key=lambda i: (len(ids[i]), i))
    rows: dict[int, dict] = {}
    for lo in range(0, len(order), batch_size):
        batch = order[lo:lo + batch_size]
        explained = explain_batch(llm.model, llm.tokenizer, [ids[i] for i in batch],
                                  [items[i].target for i in batch], method=method, kv_cache=kv_cache,
                                  cache_tokens=cache_tokens, layers=layers)
        rows.update((i, _row(items[i], e)) for i, e in zip(batch, explained))
        if bar is not None:
            bar.update(len(batch))
    return [rows[i] for i in range(len(items))]


def diff_shard(llm, base, items: Sequence[Item], method: str = DEFAULT_DIFF_METHOD, bar=None,
               layers: str | Sequence[int] | None = "all") -> list[dict]:
    """The diff rows of ``items`` (``llm`` tuned, against ``base``), in their order, one record at
    a time: :func:`~lucidlm.explain.diff.explain_diff` with the latent relevances of ``layers``.

    >>> from lucidlm import LLM, Config, GPT
    >>> tuned, base = (LLM(GPT(Config.from_name("tiny-llama")).eval()) for _ in range(2))
    >>> [(r["id"], r["base"]["target_ids"] == r["tuned"]["target_ids"]) for r in diff_shard(tuned, base,
    ...  read_items([{"prompt": [4, 2]}, {"prompt": [7], "target": 3}]))]
    [(0, True), (1, True)]
    """
    from .diff import explain_diff

    rows = []
    for item in items:
        ids = _prompt_ids(llm.tokenizer, item)
        prompt = item.prompt if isinstance(item.prompt, str) else ids  # text: the rows keep it (word alignment)
        # checked: the run compared the two models once, before the first shard
        diff = explain_diff(llm.model, llm.tokenizer, base.model, base.tokenizer, prompt, target=item.target,
                            method=method, layers=layers, checked=True)
        rows.append(_row(item, diff))
        if bar is not None:
            bar.update(1)
    return rows


def _prompt_ids(tokenizer, item: Item) -> list[int]:
    from ..errors import TokenizerError
    from .explainer import prompt_ids

    try:
        if item.messages is not None:
            if tokenizer is None:
                raise DataError("'messages' need a tokenizer with a chat template; the model has none")
            return tokenizer.encode_chat(item.messages, add_generation_prompt=True)
        return prompt_ids(tokenizer, item.prompt)
    except (TokenizerError, ExplainError, DataError) as exc:
        raise DataError(f"{item.source}: {exc}") from None


def _row(item: Item, e) -> dict[str, Any]:
    """The output row of ``item``: its id, then its explanation's (or diff's) wire form."""
    return {"id": item.id, **e.to_dict()}


def _bar(total: int, show: bool):
    if show:
        from ..progress import progress

        return progress(total, "explain-dataset", unit="record")
    return _NoBar()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _check_resume(out: Path, settings: dict, write: bool) -> None:
    """Refuse a directory written with other settings; record ours (rank 0) in a new one."""
    from ..fileio import atomic_write, read_json

    for name in (RUN_FILE, MANIFEST):
        if (out / name).is_file():
            _same_settings(out / name, read_json(out / name, ExplainError, "explain-dataset settings"), settings)
            return
    if any(out.glob("shard-*")):
        raise ExplainError(f"{out} holds shard files but no {RUN_FILE}: not an explain-dataset output directory "
                           "that can be resumed; choose another --out")
    if write:
        atomic_write(out / RUN_FILE, json.dumps(settings, indent=1, sort_keys=True) + "\n")


def _same_settings(path: Path, saved: Any, settings: dict) -> None:
    if not isinstance(saved, dict):
        raise ExplainError(f"{path}: expected a JSON object of settings")
    for key in SETTINGS:
        if key in saved and saved[key] != settings[key]:
            raise ExplainError(f"{path}: this directory holds a run with {key}={saved[key]!r}, but this run has "
                               f"{key}={settings[key]!r}: rerun with the same settings to resume, or choose "
                               "another --out")


def _write_manifest(out: Path, settings: dict, shards: list[Sequence[Item]], names: list[str]) -> None:
    from ..fileio import atomic_write

    fields = ROW_FIELDS if settings.get("diff_against") is None else DIFF_ROW_FIELDS
    manifest = dict(settings, records=sum(map(len, shards)), fields=list(fields),
                    shards=[{"file": name, "rows": len(shard)} for name, shard in zip(names, shards)])
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
