"""AttnLRP variants on SmolLM2: which rules put the relevance where the prediction depends on it?

    .venv/bin/python scripts/attnlrp_variants.py [--prompts FILE] [--limit N] [--threads 1]

Each variant is a documented choice of LRP rules, run on the embedded SmolLM2-135M-Instruct and
scored with the deletion test of :func:`lucidlm.evaluate.faithfulness` (the prompts of
``lucidlm/bench/faithfulness_prompts.txt``, each explained for the model's top next token; the
replacement token is the single space):

* ``deletion``: area under the target's score as the most relevant tokens are replaced first
  (lower is better), with the score a probability (``p``) and a logit (``z``);
* ``ABPC``: area(least relevant first) − area(most relevant first) (higher is better);
* both with token 0 ranked like any other token and with token 0 never replaced (``keep_first``)
  for every variant: the first token is an attention sink, and CP-LRP puts a large share of the
  relevance on it; replacing it says little about the ranking of the rest;
* ``vs attnlrp``: the per-prompt difference of the deletion area (and of ABPC; token 0 kept) from
  AttnLRP's: mean ± standard error, and the number of prompts on which the variant is better/worse;
* ``deletion z normalised``: the logit curve's Σ (area − y_n) / Σ (y_0 − y_n) over the prompts, as
  ``lucidlm bench faithfulness`` reports it;
* ``sink share``: Σ|R_0| / Σ|R| over the prompts, the share of the relevance on token 0;
* ``ms``: median wall time of one explanation (one forward and one backward) over ``--rounds``
  rounds of the first ``--time-prompts`` prompts, the variants interleaved; this machine, CPU.

The variants (rules as in :mod:`lucidlm.model.rules`; γ-LRP from :mod:`lucidlm.hf.patches`):

* ``attnlrp``: LXT's AttnLRP (Achtibat et al. 2024): identity rule on activations, uniform rule
  on the GLU product and on q·kᵀ and A·V, gradient × input of the softmax, constant normalisers;
* ``cp-lrp``: LXT's CP-LRP (Ali et al. 2022): softmax and GLU gate constant;
* ``cp-attention``: CP-LRP inside attention, AttnLRP outside (the GLU's uniform rule): LXT's pairing
  for ViTs, and lucidlm's ``cp-lrp`` before it matched LXT's;
* ``attnlrp + cp gate``: the reverse: AttnLRP's attention, CP-LRP's constant GLU gate;
* ``... + γ=g``: the LRP-γ rule (Montavon et al. 2019, Sec. 10.2.2; AttnLRP Sec. 3.3.4 uses it for
  ViTs) on every linear layer of the blocks (``all``) or of the MLPs only (``mlp``).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class Variant:
    """A choice of rules: the ``base`` method of :mod:`lucidlm.rules`, optionally the GLU gate
    overridden (``"keep"``: AttnLRP's uniform rule; ``"detach"``: CP-LRP's constant gate) and LRP-γ
    on the linear layers (``gamma_on``: ``"all"`` linear layers of the blocks or ``"mlp"`` only)."""

    name: str
    base: str
    gate: str | None = None
    gamma: float | None = None
    gamma_on: str = "all"


VARIANTS = [
    Variant("attnlrp", "attnlrp"),
    Variant("cp-lrp", "cp-lrp"),
    Variant("cp-attention", "cp-lrp", gate="keep"),
    Variant("attnlrp + cp gate", "attnlrp", gate="detach"),
    *(Variant(f"attnlrp + γ={g}", "attnlrp", gamma=g) for g in (0.01, 0.05, 0.1, 0.25)),
    *(Variant(f"attnlrp + γ={g} mlp", "attnlrp", gamma=g, gamma_on="mlp") for g in (0.05, 0.25)),
    Variant("cp-attention + γ=0.05", "cp-lrp", gate="keep", gamma=0.05),
    Variant("inputxgrad", "inputxgrad"),
]


@contextlib.contextmanager
def applied(variant: Variant, model: nn.Module) -> Iterator[None]:
    """The variant's overrides on ``model`` for the block (the base method is set by ``explain``)."""
    from lucidlm.hf.patches import gamma_rule
    from lucidlm.model import rules

    saved_gate = rules.gate
    overrides = {"keep": lambda x: x, "detach": rules.stop_gradient}
    patched = []
    try:
        if variant.gate is not None:
            rules.gate = overrides[variant.gate]
        if variant.gamma is not None:
            for name, module in model.named_modules():
                if isinstance(module, nn.Linear) and (variant.gamma_on == "all" or ".mlp." in name):
                    module.forward = (lambda x, m=module: gamma_rule(F.linear, x, m.weight, m.bias, variant.gamma))
                    patched.append(module)
        yield
    finally:
        rules.gate = saved_gate
        for module in patched:
            del module.forward


def explain_all(llm, prompts: list[str], variant: Variant) -> list:
    """The explanation of every prompt for its top next token under ``variant``."""
    from lucidlm.explain.explainer import explain

    with applied(variant, llm.model):
        return [explain(llm.model, llm.tokenizer, prompt, method=variant.base) for prompt in prompts]


def timings(llm, prompts: list[str], variants: list[Variant], rounds: int) -> dict[str, float]:
    """Median seconds of one explanation per variant, the variants interleaved prompt by prompt
    (so that a machine shared with other work slows them alike)."""
    from lucidlm.explain.explainer import explain

    seconds: dict[str, list[float]] = {v.name: [] for v in variants}
    for i in range(rounds + 1):  # round 0 warms up
        for prompt in prompts:
            for variant in variants:
                with applied(variant, llm.model):
                    start = time.perf_counter()
                    explain(llm.model, llm.tokenizer, prompt, method=variant.base)
                    if i:
                        seconds[variant.name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def scores(llm, explanations: list, keep_first: bool, score: str):
    """:class:`~lucidlm.evaluate.FaithfulnessResult` of the deletion and ABPC metrics."""
    from lucidlm.evaluate import faithfulness

    items = [(e.token_ids, e.relevance.double(), e.target_ids[0]) for e in explanations]
    return faithfulness(llm, items, metrics=["deletion", "abpc"], score=score, keep_first=keep_first)


def normalised_deletion(result) -> float:
    """Σ (area − y_n) / Σ (y_0 − y_n) over the prompts (the logit curves of ``lucidlm bench
    faithfulness``): 1 = the score holds until the last token goes, 0 = it drops to the floor at once."""
    examples = result.examples
    return sum(e.metrics["deletion"] - e.empty_score for e in examples) / sum(
        e.full_score - e.empty_score for e in examples)


def paired(ours: list[float], reference: list[float], lower_is_better: bool = True) -> str:
    """Mean difference ± its standard error, and the prompts on which ``ours`` is better / worse."""
    diff = [a - b for a, b in zip(ours, reference)]
    mean = statistics.fmean(diff)
    se = statistics.stdev(diff) / len(diff) ** 0.5 if len(diff) > 1 else float("nan")
    sign = 1 if lower_is_better else -1
    better, worse = sum(sign * d < -1e-12 for d in diff), sum(sign * d > 1e-12 for d in diff)
    return f"{mean:+.4f} ± {se:.4f} ({better}/{worse})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default=None, help="one prompt a line (default: the packaged file)")
    parser.add_argument("--limit", type=int, default=None, help="the first N prompts only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--time-prompts", type=int, default=5, help="prompts timed (interleaved)")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds over those prompts")
    parser.add_argument("--only", default=None, help="comma-separated variant names (attnlrp always runs first)")
    args = parser.parse_args()
    from lucidlm import LLM
    from lucidlm.bench.faithfulness import load_prompts

    torch.set_num_threads(args.threads)
    llm = LLM.load(progress=False)
    llm.model.eval()
    prompts = load_prompts(args.prompts)[: args.limit]
    variants = [v for v in VARIANTS if v.name == "attnlrp" or args.only is None or v.name in args.only.split(",")]
    print(f"{len(prompts)} prompts, SmolLM2-135M-Instruct float32, torch threads {args.threads}\n")
    print("| variant | deletion p | deletion p, token 0 kept | vs attnlrp: mean ± s.e. (better/worse prompts) "
          "| deletion z normalised, token 0 kept | ABPC p | ABPC p, token 0 kept | vs attnlrp | sink share | ms |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    explanations = {v.name: explain_all(llm, prompts, v) for v in variants}
    ms = timings(llm, prompts[: args.time_prompts], variants, args.rounds)
    reference = reference_abpc = None
    for variant in variants:
        found = explanations[variant.name]
        p_all, p_kept = scores(llm, found, False, "prob"), scores(llm, found, True, "prob")
        z_kept = scores(llm, found, True, "logit")
        kept, abpc = p_kept.values("deletion"), p_kept.values("abpc")
        reference = kept if reference is None else reference
        reference_abpc = abpc if reference_abpc is None else reference_abpc
        share = sum(float(e.relevance[0].abs()) for e in found) / sum(float(e.relevance.abs().sum()) for e in found)
        print(f"| {variant.name} | {p_all.mean['deletion']:.4f} | {p_kept.mean['deletion']:.4f} "
              f"| {paired(kept, reference)} | {normalised_deletion(z_kept):.3f} | {p_all.mean['abpc']:.3f} "
              f"| {p_kept.mean['abpc']:.3f} | {paired(abpc, reference_abpc, lower_is_better=False)} | {share:.2f} "
              f"| {1000 * ms[variant.name]:.0f} |", flush=True)


if __name__ == "__main__":
    main()
