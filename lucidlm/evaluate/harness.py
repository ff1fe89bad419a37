"""lm-evaluation-harness on lucidlm's own model: :class:`LucidLM`, an ``lm_eval`` model backed by an
:class:`~lucidlm.api.LLM`, registered with the harness under the name ``lucidlm``.

Adapters, KV-cache policies, int8 weights and custom architectures are evaluated exactly as they
run here. Token boundaries follow the harness's own ``HFLM`` (the context is encoded, then context
plus continuation, and the continuation is what the whole adds; trailing spaces of the context move
to the continuation), so per-sample log-likelihoods equal HFLM's on the same weights.

From Python (``pip install lucidlm[eval]``)::

    import lm_eval
    from lucidlm import LLM
    from lucidlm.evaluate.harness import LucidLM

    results = lm_eval.simple_evaluate(model=LucidLM(LLM.load()), tasks=["hellaswag"], limit=100)

From the harness's own command line (after ``import lucidlm.evaluate.harness`` registered it):
``--model lucidlm --model_args pretrained=PATH,adapter=DIR,kv_cache=snapkv,cache_tokens=25%,dtype=bfloat16``.

With a ``kv_cache`` policy, each request streams through a cache of that policy holding
``cache_tokens`` slots (a token count, or a share of the request's context such as ``"25%"``): the
context is prefilled (and compressed), then the continuation is scored (or generated) against what
the cache kept, as NVIDIA kvpress measures compression.
Without one, each batch is one full forward pass.

Without ``lm_eval`` installed, :func:`require_lm_eval` raises an :class:`~lucidlm.errors.EvaluationError`
that names the extra:

>>> from lucidlm.evaluate.harness import EXTRA
>>> EXTRA
'pip install lucidlm[eval]'
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..api import LLM
from ..cache import build_cache
from ..cache.prefill import stream
from ..cache.spec import PolicySpec, check_budget, parse_policy
from ..errors import CacheError, EvaluationError
from ..generate import Sampling, generate_ids, left_pad

#: how to install what this module needs
EXTRA = "pip install lucidlm[eval]"
#: the name the harness knows this model by (``--model lucidlm``)
NAME = "lucidlm"


def require_lm_eval():
    """The ``lm_eval`` package, or :class:`EvaluationError` naming the extra to install."""
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401
        import lm_eval.api.registry  # noqa: F401
    except ImportError as exc:
        raise EvaluationError(f"lm-evaluation-harness is not installed ({exc.name or 'lm_eval'} missing): "
                              f"{EXTRA}") from None
    return lm_eval


def _base():
    try:
        from lm_eval.api.model import TemplateLM
    except ImportError:  # the class below still defines; using it raises the typed error
        return object
    return TemplateLM


class LucidLM(_base()):
    """An ``lm_eval`` model (``lm_eval.api.model.LM``) backed by an :class:`~lucidlm.api.LLM`.

    ``llm``: an :class:`LLM`, or a path / repo id to load (``pretrained`` is the harness's name for
    it; None: the embedded model) with ``adapter``, ``dtype`` and ``quantize``. ``kv_cache`` and
    ``cache_tokens``: the KV-cache policy and budget every request runs through (None: dense).
    ``batch_size``: requests per forward pass or generation batch. ``add_bos_token``: as HFLM's
    (None: the tokenizer's default). ``max_gen_toks``: generation length unless a task says.
    """

    def __init__(self, llm: LLM | str | None = None, *, pretrained: str | None = None, adapter: str | None = None,
                 kv_cache: str | None = None, cache_tokens: int | str | None = None, dtype: str = "float32",
                 quantize: str | None = None, batch_size: int | str = 1, add_bos_token: bool | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256, chunk_size: int = 256,
                 device: str | None = None, **unused: Any) -> None:
        require_lm_eval()
        super().__init__()
        if llm is not None and pretrained is not None:
            raise EvaluationError("give the model once: as llm or as pretrained, not both")
        if not isinstance(llm, LLM):
            path = llm if llm is not None else pretrained
            llm = LLM.load(path, adapter=adapter, dtype=dtype, device=device or "cpu", quantize=quantize)
        elif adapter is not None:
            llm.load_adapter(adapter)
        if llm.tokenizer is None:
            raise EvaluationError(f"{llm.name} has no tokenizer: the harness needs text in and out")
        self.llm = llm
        self.llm.model.eval()
        self.policy = None if kv_cache in (None, "", "none") else parse_policy(kv_cache)
        self.cache_tokens = check_budget(cache_tokens)
        if self.cache_tokens is not None and self.policy is None:
            self.policy = parse_policy("window")  # as the command line does with --cache-tokens alone
        self.batch_size = _batch_size(batch_size)
        self.add_bos_token = add_bos_token
        self._max_length = int(max_length) if max_length else llm.config.block_size
        self._max_gen_toks = int(max_gen_toks)
        self.chunk_size = int(chunk_size)
        self.dtype = dtype

    # ---- what the harness asks of a model ------------------------------------------------------
    @property
    def tokenizer(self):
        return self.llm.tokenizer

    @property
    def eot_token_id(self) -> int:
        tok = self.tokenizer
        eos = tok.token_to_id(tok.eos_token) if tok.eos_token else None
        return eos if eos is not None else tok.eos_ids[0]

    @property
    def prefix_token_id(self) -> int:
        tok = self.tokenizer
        bos = tok.token_to_id(tok.bos_token) if tok.bos_token else None
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self):
        return next(self.llm.model.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        return str(self.llm.source or self.llm.name).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        return self.tokenizer.chat_template or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat rendered with the checkpoint's template, as HFLM renders it."""
        from ..errors import TokenizerError

        try:
            return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt)
        except TokenizerError:  # as HFLM: retry without the system turn
            history = [m for m in chat_history if m["role"] != "system"]
            return self.tokenizer.apply_chat_template(history, add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """Token ids as HFLM encodes them (no BOS added to a string that already starts with it)."""
        if add_special_tokens is None:
            add_special_tokens = True if self.add_bos_token is None else bool(self.add_bos_token)
            if string.startswith(self.tokenizer.decode([self.prefix_token_id])):
                add_special_tokens = False
        ids = self.tokenizer.encode(string, add_special_tokens=add_special_tokens)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ---- scoring ------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None,
                              **kwargs) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), greedy?)`` per ``(key, context_ids, continuation_ids)``."""
        inputs = []
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self.max_length + 1):][:-1]
            inputs.append((whole, list(continuation)))
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))  # similar lengths batch together
        results: list[tuple[float, bool] | None] = [None] * len(inputs)
        size = override_bs or self.batch_size
        dense = self.policy is None or (self.policy.is_plain_dense and self.cache_tokens is None)
        bar = _progress(len(inputs), "loglikelihood", disable_tqdm)
        for start in range(0, len(order), size):
            rows = order[start:start + size]
            batch = [inputs[i] for i in rows]
            scored = self._score_dense(batch) if dense else [self._score_cached(*item) for item in batch]
            for i, answer in zip(rows, scored):
                results[i] = answer
            bar.update(len(rows))
        bar.close()
        for (key, _, _), answer in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    @torch.inference_mode()
    def _score_dense(self, batch: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """One forward pass of left-padded inputs; logits only where a continuation is predicted."""
        ids, pos = left_pad([whole for whole, _ in batch])
        width = ids.shape[1]
        select = torch.zeros_like(ids, dtype=torch.bool)
        for row, (_, cont) in enumerate(batch):
            select[row, width - len(cont):] = True
        logits = self.llm.model(ids.to(self.device), positions=pos.to(self.device), select=select.to(self.device))
        out, offset = [], 0
        for _, cont in batch:
            out.append(_judge(logits[offset:offset + len(cont)], cont))
            offset += len(cont)
        return out

    @torch.inference_mode()
    def _score_cached(self, whole: list[int], cont: list[int]) -> tuple[float, bool]:
        """The context prefilled through the policy's cache, then the continuation scored against
        what the cache kept."""
        split = len(whole) - len(cont) + 1  # the context's tokens: the last one predicts the first continuation token
        param = next(self.llm.model.parameters())
        budget = self.policy.budget(self.cache_tokens, len(whole), prompt=split)
        try:
            cache = build_cache(self.llm.config, 1, self.policy, budget, dtype=param.dtype, device=param.device)
        except CacheError:  # a budget below the policy's protected slots (a short context's share) ...
            if budget < len(whole):
                raise
            # ... that holds everything evicts nothing: the (quantised) dense cache is the same run
            cache = build_cache(self.llm.config, 1, PolicySpec("dense", self.policy.quant), budget,
                                dtype=param.dtype, device=param.device)
        x = torch.tensor([whole], device=param.device)
        logits = [chunk for chunk in stream(self.llm.model, x[:, :split], cache, self.chunk_size, last_only=True)][-1]
        pieces = [logits[0]]
        if split < len(whole):
            pieces += [chunk[0] for chunk in stream(self.llm.model, x[:, split:], cache, self.chunk_size)]
        return _judge(torch.cat(pieces), cont)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in disjoint windows of the context length, as HFLM."""
        from lm_eval import utils

        windows, counts = [], []
        for (string,) in [req.args for req in requests]:
            pieces = list(map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)))
            windows += [(None, *piece) for piece in pieces]
            counts.append(len(pieces))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals, at = [], 0
        for request, count in zip(requests, counts):
            total = sum(score for score, _ in scores[at:at + count])
            at += count
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ---- generation ---------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batched generation through :func:`lucidlm.generate.generate_ids`, stopping at the task's
        stop strings and the model's stop tokens; greedy unless the task's gen_kwargs sample."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        results: list[str | None] = [None] * len(requests)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        bar = _progress(len(requests), "generate_until", disable_tqdm)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks"))
            sampling = _sampling(kwargs)
            encoded = {i: self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_new)
                       for i in members}
            members = sorted(members, key=lambda i: -len(encoded[i]))
            for start in range(0, len(members), self.batch_size):
                rows = members[start:start + self.batch_size]
                for i, text in zip(rows, self._generate([encoded[i] for i in rows], max_new, sampling, until)):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(rows))
        bar.close()
        return results

    def _generate(self, prompts: list[list[int]], max_new: int, sampling: Sampling, until: list[str]) -> list[str]:
        from lm_eval.models.utils import postprocess_generated_text

        outputs: list[list[int]] = [[] for _ in prompts]
        stopped = [False] * len(prompts)
        steps = generate_ids(self.llm.model, prompts, max_new, sampling, self.tokenizer.eos_ids,
                             kv_cache=self.policy or "dense", cache_tokens=self.cache_tokens,
                             chunk_size=self.chunk_size)
        for step in steps:
            for row, token in enumerate(step):
                if token is not None and not stopped[row]:
                    outputs[row].append(token)
                    text = self.tok_decode(outputs[row][-16:])
                    stopped[row] = any(s and s in text for s in until)
            if all(stopped):
                break
        return [postprocess_generated_text(self.tok_decode(o), until, None) for o in outputs]

    def get_model_info(self) -> dict:
        """What results.json records of the model."""
        return {"model": str(self.llm.source or self.llm.name), "policy": None if self.policy is None
                else str(self.policy), "budget": self.cache_tokens, "dtype": str(self.dtype)}


def _judge(logits: torch.Tensor, targets: list[int]) -> tuple[float, bool]:
    """Summed log-probability of ``targets`` under ``logits`` (n, vocab) and whether each is the argmax."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(targets, device=logits.device)
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def _sampling(kwargs: dict) -> Sampling:
    if not kwargs.get("do_sample"):
        return Sampling()
    return Sampling(float(kwargs.get("temperature") or 1.0), kwargs.get("top_k"), kwargs.get("top_p"),
                    kwargs.get("seed"))


def _batch_size(value: int | str) -> int:
    text = str(value)
    if text.startswith("auto"):
        return 8
    try:
        size = int(text)
    except ValueError:
        raise EvaluationError(f"batch_size={value!r}: expected a positive integer") from None
    if size < 1:
        raise EvaluationError(f"batch_size={value!r}: expected a positive integer")
    return size


def _progress(total: int, desc: str, disabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=disabled, leave=False)


def register() -> type:
    """Register :class:`LucidLM` with the harness as ``lucidlm`` (idempotent); returns the class."""
    require_lm_eval()
    from lm_eval.api.registry import get_model, register_model

    try:
        if get_model(NAME) is LucidLM:
            return LucidLM
    except Exception:  # not registered yet (the harness raises its own error type)
        pass
    register_model(NAME)(LucidLM)
    return LucidLM


try:  # registered when this module is imported, never when lucidlm is
    register()
except EvaluationError:
    pass

__all__ = ["EXTRA", "NAME", "LucidLM", "register", "require_lm_eval"]


# ----------------------------------------------------------------------------- tasks
def task_names(text: str) -> list[str]:
    """``--tasks`` text as task names (an EvaluationError when it names none).

    >>> task_names("arc_easy, hellaswag")
    ['arc_easy', 'hellaswag']
    """
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise EvaluationError("--tasks names no task")
    return names


def task_manager(names: list[str], include_path: Path | str | None = None):
    """The harness's ``TaskManager`` (with the tasks of ``include_path``), after checking that every
    name is one of its tasks (or a task YAML file): an EvaluationError names the unknown ones."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise EvaluationError(f"--include-path {include_path}: no such directory")
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known and not Path(n).is_file()]
    if unknown:
        where = f"the harness's tasks or {include_path}" if include_path is not None else "the harness's tasks"
        raise EvaluationError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
                              f"not in {where} (lm-eval ls tasks lists them; --include-path adds your own)")
    return manager
