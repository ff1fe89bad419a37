"""AttnLRP and CP-LRP mean what LXT (the authors' implementation) means by them.

``tests/data/lxt/*.json`` hold relevances computed by LXT 2.1 itself (lxt.efficient, on
transformers 4.57, in its own venv: see ``scripts/lxt_record.py``, which also wrote the tiny
models' weights beside them). Both of lucidlm's paths must reproduce them on the same weights and
ids: the native model (``lucidlm.LLM.load`` → ``explain``) and the patch layer
(``lucidlm.hf.explain`` on the ``transformers`` 5 model). The tiny random models (Llama, Qwen2 with
q/k/v biases, Qwen3 with q/k norms, Gemma 3 with its GeGLU and sandwich norms, GPT-2 with LayerNorm
and biases) run in float64; the embedded SmolLM2-135M-Instruct in float32 as recorded. LXT 2.1 has
no other causal-LM map (its models: llama, qwen2, qwen3, gemma3, gpt2, bert, vit).
"""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

import lucidlm
from lucidlm import hf

DATA = pathlib.Path(__file__).parent / "data" / "lxt"
TINY = ["llama", "qwen2", "qwen3", "gemma3", "gpt2"]
METHODS = ["attnlrp", "cp-lrp"]
#: relative L2 distance allowed. Measured: at most 4e-7 on the tiny models, 6e-7 on SmolLM2. The
#: float64 models do not agree further because LXT's RMSNorm patch and transformers 4.57's eager
#: softmax compute in float32 whatever the model's dtype (lucidlm keeps float64 in float64).
TOLERANCE = {"float64": 2e-6, "float32": 1e-5}


def reference(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


def rel_l2(ours: torch.Tensor, theirs: list[float]) -> float:
    ref = torch.tensor(theirs, dtype=torch.float64)
    return float((ours.double() - ref).norm() / ref.norm())


def check(explain, data: dict, method: str) -> list[float]:
    """Explain every recorded sequence for its recorded target; return the distances."""
    distances = []
    for record in data["records"]:
        e = explain(record["ids"], record["target"], method)
        assert e.target_logit == pytest.approx(record["logit"], rel=1e-5)
        distances.append(rel_l2(e.relevance, record["relevance"][method]))
    assert max(distances) < TOLERANCE[data["meta"]["dtype"]], distances
    return distances


@pytest.fixture(scope="module")
def tiny():
    """family -> (lucidlm.LLM, transformers model), float64, loaded once."""
    import transformers

    cache = {}

    def get(family: str):
        if family not in cache:
            directory = DATA / family
            llm = lucidlm.LLM.load(directory, dtype=torch.float64)
            model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64).eval()
            cache[family] = (llm, model)
        return cache[family]

    return get


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", TINY)
def test_native_model_reproduces_lxt_on_tiny_models(tiny, family, method):
    llm, _ = tiny(family)
    check(lambda ids, t, m: llm.explain(ids, target=t, method=m), reference(family), method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", TINY)
def test_patched_transformers_reproduces_lxt_on_tiny_models(tiny, family, method):
    _, model = tiny(family)
    check(lambda ids, t, m: hf.explain(model, ids, target=t, method=m), reference(family), method)


@pytest.fixture(scope="module")
def smollm2(converted):
    """The embedded model twice, float32: lucidlm's native model and transformers' from the same
    converted directory (the one LXT read)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    return lucidlm.LLM.load(progress=False), model


@pytest.mark.parametrize("method", METHODS)
def test_embedded_smollm2_reproduces_lxt(smollm2, method):
    llm, model = smollm2
    data = reference("smollm2")
    assert [r["ids"] for r in data["records"]] == [llm.tokenizer.encode(r["prompt"]) for r in data["records"]]
    check(lambda ids, t, m: llm.explain(ids, target=t, method=m), data, method)
    check(lambda ids, t, m: hf.explain(model, ids, target=t, method=m), data, method)


def test_recorded_cp_lrp_conserves_where_lxt_says_it_should():
    """The reference itself: LXT's CP-LRP on bias-free models sums to the logit (its defining
    property), and its AttnLRP does not (so the two recordings are different methods)."""
    for name in ["llama", "qwen3", "gemma3", "smollm2"]:
        for record in reference(name)["records"]:
            attn, cp = (sum(record["relevance"][m]) for m in METHODS)
            assert cp == pytest.approx(record["logit"], rel=1e-4)
            assert abs(attn - record["logit"]) > 1e-2 * abs(record["logit"])
