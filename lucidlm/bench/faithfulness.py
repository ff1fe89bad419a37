"""``lucidlm bench faithfulness``: do explanations point at the tokens the prediction depends on?

Deletion test (input perturbation, as in the AttnLRP paper, Achtibat et al. 2024, Sec. 4): for each
prompt, explain the model's top next token, then replace prompt tokens by a fixed token one at a
time in order of relevance and re-run the model, tracking the target's logit y_k after k deletions.

* MoRF (most relevant first): a faithful explanation removes the evidence first, so the logit
  falls fast and the area under the curve is small.
* LeRF (least relevant first): the logit should hold up, a large area.
* ABPC (area between the perturbation curves) = area(LeRF) − area(MoRF): large is better; a random
  order scores about 0.

Normalisation. Every order ends at the same input (all tokens replaced), so y_n is a common floor
and y_0 a common start: a curve's area is the mean of (y_k − y_n) over the n + 1 steps (trapezoid
rule on [0, 1]) and the prompt's scale is y_0 − y_n. Per-prompt ratios blow up when a prompt's
scale is near 0 (or negative: some all-replaced inputs still predict the target strongly), so the
reported area of a method is Σ areas / Σ scales over the prompts: 1 means "the logit holds until the
last token goes", 0 "it drops to the floor at once", below 0 "it drops below the floor".

>>> import torch
>>> raw_area(torch.tensor([4.0, 2.0, 0.0]))   # a straight line from 4 to 0: half of 4
2.0
"""

from __future__ import annotations

import argparse
import importlib.resources
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .args import FAITHFULNESS_METHODS as METHODS  # the explanation methods and the random baseline
from .args import add_faithfulness as add_arguments

PROMPT_FILE = "faithfulness_prompts.txt"


# ----------------------------------------------------------------------------- prompts
def load_prompts(path: str | Path | None = None) -> list[str]:
    """Prompts, one a line (blank lines and ``#`` comments skipped); default: the packaged file."""
    if path is None:
        text = importlib.resources.files("lucidlm.bench").joinpath(PROMPT_FILE).read_text("utf-8")
    else:
        text = Path(path).read_text("utf-8")
    return [line.rstrip("\n") for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


# ----------------------------------------------------------------------------- curves
@torch.no_grad()
def deletion_curves(model, ids: Sequence[int], target: int, orders: torch.Tensor, replacement: int) -> torch.Tensor:
    """Target logit after replacing the first k tokens of each order, k = 0..n.

    ``orders``: (n_orders, n) permutations of the token indices. Returns (n_orders, n + 1). The
    perturbed prompts run as one batch, each distinct prompt once (every order starts from the
    intact prompt and ends at the all-replaced one).
    """
    n_orders, n = orders.shape
    base = torch.tensor(list(ids))
    rank = torch.empty_like(orders).scatter_(1, orders, torch.arange(n).expand(n_orders, n))
    deleted = rank[:, None, :] < torch.arange(n + 1)[None, :, None]  # [o, k, j]: j among the first k
    batch = torch.where(deleted, torch.full_like(base, replacement), base).reshape(-1, n)
    unique, inverse = torch.unique(batch, dim=0, return_inverse=True)
    device = next(model.parameters()).device
    logits = model(unique.to(device), last_only=True)[:, -1, target].float().cpu()
    return logits[inverse].reshape(n_orders, n + 1)


def raw_area(curve: torch.Tensor) -> float:
    """Area between a deletion curve and its end value y_n, on [0, 1] (trapezoid rule)."""
    y = curve - curve[-1]
    return float(((y[1:] + y[:-1]) / 2).mean())


@dataclass
class Scores:
    """One method's raw areas per prompt (see the module docstring)."""

    morf: list[float] = field(default_factory=list)
    lerf: list[float] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)

    def area(self, which: str) -> float:
        """Normalised area over all prompts: Σ raw areas / Σ scales."""
        return sum(getattr(self, which)) / sum(self.scale)

    @property
    def abpc(self) -> float:
        return self.area("lerf") - self.area("morf")


def prompt_curves(model, tokenizer, prompt: str | Sequence[int], methods: Sequence[str] = METHODS,
                  replacement: int = 0, n_random: int = 4, seed: int = 0,
                  lerf: bool = True) -> dict[str, dict[str, float]]:
    """``{method: {"morf", "lerf", "scale"}}`` (raw areas) for one prompt and its top next token.

    ``random`` averages ``n_random`` random orders (its LeRF is each order reversed).
    ``lerf=False`` skips the LeRF curves (half the forwards; ``"lerf"`` is then NaN).
    """
    from ..explain.explainer import explain, prompt_ids

    ids = prompt_ids(tokenizer, prompt)
    target = _top_token(model, ids)
    per_method = {}
    for method in methods:
        if method == "random":
            g = torch.Generator().manual_seed(seed)
            per_method[method] = torch.stack([torch.randperm(len(ids), generator=g) for _ in range(n_random)])
        else:
            relevance = explain(model, tokenizer, ids, target=target, method=method).relevance
            per_method[method] = torch.argsort(relevance, descending=True, stable=True)[None]
    morf = torch.cat(list(per_method.values()))
    curves = deletion_curves(model, ids, target, torch.cat([morf, morf.flip(1)]) if lerf else morf, replacement)
    areas = [raw_area(c) for c in curves]
    scale = float(curves[0, 0] - curves[0, -1])
    out, start = {}, 0
    for method, orders in per_method.items():
        k = len(orders)
        mean = lambda a: sum(a) / len(a)  # noqa: E731
        out[method] = {"morf": mean(areas[start:start + k]), "scale": scale,
                       "lerf": mean(areas[len(morf) + start:len(morf) + start + k]) if lerf else float("nan")}
        start += k
    return out


@torch.no_grad()
def _top_token(model, ids: Sequence[int]) -> int:
    device = next(model.parameters()).device
    return int(model(torch.tensor([list(ids)], device=device), last_only=True)[0, -1].argmax())


def evaluate(model, tokenizer, prompts: Sequence[str], methods: Sequence[str] = METHODS,
             replacement: int = 0, n_random: int = 4, lerf: bool = True,
             progress: bool = False) -> dict[str, Scores]:
    """:class:`Scores` per method over ``prompts``. ``progress``: a bar on stderr counting the
    prompts, with each method's ABPC so far."""
    from . import progress as progress_bar

    scores = {m: Scores() for m in methods}
    bar = progress_bar(len(prompts), "bench faithfulness", unit="prompt") if progress else None
    for i, prompt in enumerate(prompts):
        result = prompt_curves(model, tokenizer, prompt, methods, replacement, n_random, seed=i, lerf=lerf)
        for m, r in result.items():
            for key, value in r.items():
                getattr(scores[m], key).append(value)
        if bar is not None:
            running = [f"{m} {s.abpc:.2f}" for m, s in scores.items() if sum(s.scale)]
            bar.set_postfix_str("ABPC " + ", ".join(running) if running and lerf else "")
            bar.update(1)
    if bar is not None:
        bar.close()
    return scores


def replacement_id(tokenizer, text: str | None) -> int:
    """The id that replaces deleted tokens: ``text`` must be one token (default: a single space),
    or id 0 without a tokenizer."""
    if tokenizer is None:
        return 0
    ids = tokenizer.encode(text if text is not None else " ", add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"--replacement {text!r} is {len(ids)} tokens: expected exactly one")
    return ids[0]


# ----------------------------------------------------------------------------- CLI
def run(args) -> int:
    from ..api import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        print(f"unknown method(s) {', '.join(unknown)}: expected some of {', '.join(METHODS)}")
        return 2
    from . import emit

    llm = LLM.load(args.model, progress=True)
    llm.model.eval()
    prompts = load_prompts(args.prompts)
    for line in _header_lines(len(prompts), llm.source, args.replacement):  # rows: after the last prompt
        emit(line)
    t0 = time.perf_counter()
    scores = evaluate(llm.model, llm.tokenizer, prompts, methods,
                      replacement_id(llm.tokenizer, args.replacement), args.random_orders, progress=True)
    for line in format_table(scores, len(prompts), time.perf_counter() - t0).splitlines()[3:]:
        emit(line)
    return 0


def format_table(scores: dict[str, Scores], n_prompts: int, seconds: float, source: str | None = None,
                 replacement: str = " ") -> str:
    """The results as a fixed-width table: three header lines, a row per method, the time taken.

    >>> s = Scores(morf=[0.1, 0.2], lerf=[0.8, 0.9], scale=[1.0, 1.0])
    >>> print(format_table({"attnlrp": s}, 2, 3.4, "m.gguf"))
    deletion faithfulness on m.gguf: 2 prompts, deleted tokens replaced by ' '
    areas normalised by the prompts' total logit drop; MoRF: lower is better, ABPC = LeRF − MoRF: higher is better
    method        MoRF area  LeRF area    ABPC  MoRF < random
    attnlrp           0.150      0.850   0.700
    2 prompts in 3 s
    """
    lines = _header_lines(n_prompts, source, replacement)
    baseline = scores.get("random")
    for m, s in scores.items():
        wins = ("" if baseline is None or m == "random" else
                f"{sum(a < b for a, b in zip(s.morf, baseline.morf))}/{len(s.morf)}")
        lines.append(f"{m:<12}{s.area('morf'):>11.3f}{s.area('lerf'):>11.3f}{s.abpc:>8.3f}{wins:>15}".rstrip())
    lines.append(f"{n_prompts} prompts in {seconds:.0f} s")
    return "\n".join(lines)


def _header_lines(n_prompts: int, source: str | None, replacement: str = " ") -> list[str]:
    return [f"deletion faithfulness on {source or 'the model'}: {n_prompts} prompts, deleted tokens "
            f"replaced by {replacement!r}",
            "areas normalised by the prompts' total logit drop; MoRF: lower is better, "
            "ABPC = LeRF − MoRF: higher is better",
            f"{'method':<12}{'MoRF area':>11}{'LeRF area':>11}{'ABPC':>8}{'MoRF < random':>15}"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
