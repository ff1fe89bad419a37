"""lucidlm.evaluate.harness.LucidLM against lm-evaluation-harness's own HFLM on the same weights
(tiny random models of three families and the embedded model, saved as HF directories): equal
accuracies, per-sample log-likelihoods within 1e-4, equal generations. A LoRA adapter equals the
merged model; a policy whose budget evicts nothing equals dense; budgets as a share.

Offline: the tasks are YAML files over local JSONL (tests/harness_util.py).
"""

from __future__ import annotations

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from harness_util import tiny_checkpoint, write_tasks  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from lucidlm import LLM  # noqa: E402
from lucidlm.errors import CacheError, EvaluationError  # noqa: E402
from lucidlm.evaluate.harness import LucidLM  # noqa: E402

PAIRS = [("The capital of France is", " Paris"), ("The sky is ", "blue"), ("", "Hello world"),
         ("Café  au", " lait!\n"), ("a", "b c d e f"), ("Question: 2+2?\nAnswer:", " 4")]
GEN = ["Hello, my name is", "Q: What?\nA:", "x"]
TASKS = ["lucid_mc", "lucid_gen", "lucid_roll"]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def checkpoint(converted, tmp_path_factory):
    made = {}

    def get(family: str):
        if family == "embedded":
            return converted
        if family not in made:
            made[family] = tiny_checkpoint(family, converted, tmp_path_factory.mktemp(family))
        return made[family]

    return get


def _hflm(directory):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(directory), batch_size=4, device="cpu", dtype="float32")


def _ll(lm, pairs=PAIRS):
    return lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)


def _gen(lm, prompts=GEN, max_gen_toks=6):
    kwargs = {"until": ["\n", "."], "max_gen_toks": max_gen_toks, "do_sample": False}
    return lm.generate_until([Instance("generate_until", {}, (p, dict(kwargs)), i) for i, p in enumerate(prompts)],
                             disable_tqdm=True)


def _close(a, b, tol=1e-4):
    assert len(a) == len(b)
    for (x, gx), (y, gy) in zip(a, b):
        assert abs(x - y) <= tol, (x, y)
        assert gx == gy


def _evaluate(lm, tasks, **kwargs):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks))
    return lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=manager, log_samples=True, **kwargs)


def _per_sample(results, task):
    """(doc id, filtered responses) per sample: log-likelihoods for mc, text for generation."""
    return {s["doc_id"]: s["filtered_resps"] for s in results["samples"][task]}


@pytest.mark.parametrize("family", ["llama3", "qwen2", "mistral", "embedded"])
def test_equals_hflm_on_the_same_weights(family, checkpoint, tasks):
    directory = checkpoint(family)
    ours, theirs = LucidLM(pretrained=str(directory), batch_size=3), _hflm(directory)
    _close(_ll(ours), _ll(theirs))
    rolling = [Instance("loglikelihood_rolling", {}, ("The quick brown fox " * 30,), 0)]
    a, b = ours.loglikelihood_rolling(rolling, disable_tqdm=True), theirs.loglikelihood_rolling(rolling,
                                                                                               disable_tqdm=True)
    assert a[0] == pytest.approx(b[0], rel=1e-5, abs=1e-4)
    assert _gen(ours) == _gen(theirs)
    r1, r2 = _evaluate(ours, tasks), _evaluate(theirs, tasks)
    for task in TASKS:
        m1, m2 = r1["results"][task], r2["results"][task]
        for metric in ("acc,none", "acc_norm,none", "exact_match,none"):
            if metric in m2:
                assert m1[metric] == m2[metric], (task, metric)
        for metric in ("word_perplexity,none", "bits_per_byte,none"):
            if metric in m2:
                assert m1[metric] == pytest.approx(m2[metric], rel=1e-5)
    for doc, resps in _per_sample(r2, "lucid_mc").items():
        mine = _per_sample(r1, "lucid_mc")[doc]
        assert [float(x[0]) for x in mine] == pytest.approx([float(x[0]) for x in resps], abs=1e-4)
    assert _per_sample(r1, "lucid_gen") == _per_sample(r2, "lucid_gen")


def test_an_adapter_equals_the_merged_model(checkpoint, tmp_path):
    from lucidlm.train.lora import attach_lora, save_adapter

    directory = checkpoint("llama3")
    llm = LLM.load(directory)
    attach_lora(llm.model, r=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in llm.model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    save_adapter(llm.model, tmp_path / "adapter", base_model=str(directory))
    adapted = LucidLM(pretrained=str(directory), adapter=str(tmp_path / "adapter"), batch_size=2)
    merged = LucidLM(LLM.load(directory, adapter=tmp_path / "adapter").merge_adapter(), batch_size=4)
    base = LucidLM(pretrained=str(directory))
    _close(_ll(adapted), _ll(merged))
    assert _gen(adapted) == _gen(merged)
    assert max(abs(a[0] - b[0]) for a, b in zip(_ll(adapted), _ll(base))) > 1e-2  # the adapter changes things


@pytest.mark.parametrize("policy", ["window", "snapkv", "h2o", "sink+int8"])
def test_a_budget_that_evicts_nothing_equals_dense(policy, checkpoint):
    directory = checkpoint("qwen2")
    dense = LucidLM(pretrained=str(directory), batch_size=4)
    cached = LucidLM(dense.llm, kv_cache=policy, cache_tokens=100)
    if "int8" in policy:  # quantised buffers: close to dense, not equal
        assert all(abs(a[0] - b[0]) < 0.5 for a, b in zip(_ll(cached), _ll(dense)))
        return
    _close(_ll(cached), _ll(dense))
    assert _gen(cached) == _gen(dense)


def test_a_real_budget_is_a_share_of_the_context(checkpoint, tasks):
    directory = checkpoint("llama3")
    lm = LucidLM(pretrained=str(directory), kv_cache="window", cache_tokens="50%")
    # the context is prefilled whole (then compressed): the continuation's later tokens see half of it
    long = [("one two three four five six seven eight nine ten eleven twelve", " thirteen fourteen fifteen")]
    dense = LucidLM(lm.llm)
    assert abs(_ll(lm, long)[0][0] - _ll(dense, long)[0][0]) > 1e-4
    assert lm.get_model_info()["policy"] == "window" and lm.get_model_info()["budget"] == "50%"
    results = _evaluate(lm, tasks, limit=2)
    assert set(TASKS) <= set(results["results"])


@pytest.mark.parametrize("budget", ["0%", "150%", "-3", "abc%", 0])
def test_bad_budgets_are_typed_errors(budget, checkpoint):
    llm = LucidLM(pretrained=str(checkpoint("llama3"))).llm
    with pytest.raises(CacheError, match="cache_tokens"):
        LucidLM(llm, kv_cache="snapkv", cache_tokens=budget)
    with pytest.raises(CacheError, match="cache_tokens"):
        llm.generate("hello", max_new_tokens=2, kv_cache="window", cache_tokens=budget)
    with pytest.raises(CacheError, match="cache_tokens"):
        llm.perplexity("hello there friend", kv_cache="window", cache_tokens=budget)


def test_shares_reach_every_budget_taker(checkpoint):
    llm = LucidLM(pretrained=str(checkpoint("llama3"))).llm
    text = "one two three four five six seven eight nine ten"
    assert isinstance(llm.generate(text, max_new_tokens=3, kv_cache="window", cache_tokens="50%"), str)
    half = llm.perplexity(text, kv_cache="window", cache_tokens="50%", chunk_size=2).perplexity
    assert half != pytest.approx(llm.perplexity(text).perplexity, rel=1e-6)
    explained = llm.explain(text, kv_cache="window", cache_tokens="50%")
    assert explained.evicted is not None and bool(explained.evicted.any())
    from lucidlm.serve.schemas import ExplainRequest

    assert ExplainRequest(prompt="hi", cache_tokens="25%").cache_tokens == "25%"
    with pytest.raises(ValueError, match="a share must be in"):
        ExplainRequest(prompt="hi", cache_tokens="150%")
    assert llm.perplexity(text, kv_cache="window", cache_tokens="100%").perplexity == \
        pytest.approx(llm.perplexity(text).perplexity, rel=1e-5)


def test_registered_under_lucidlm_and_built_from_a_string(checkpoint):
    from lm_eval.api.registry import get_model

    cls = get_model("lucidlm")
    assert cls is LucidLM and issubclass(cls, lm_eval.api.model.LM)
    lm = cls.create_from_arg_string(f"pretrained={checkpoint('llama3')},kv_cache=snapkv,cache_tokens=25%,"
                                    "dtype=float32", {"batch_size": 2})
    assert str(lm.policy) == "snapkv" and lm.cache_tokens == "25%" and lm.batch_size == 2


def test_chat_template_as_hflm(checkpoint):
    directory = checkpoint("embedded")
    ours, theirs = LucidLM(pretrained=str(directory)), _hflm(directory)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert ours.apply_chat_template(chat) == theirs.apply_chat_template(chat)
    assert ours.chat_template(True) == theirs.chat_template(True)
    assert ours.tokenizer_name


def test_missing_extra_names_it(monkeypatch, checkpoint):
    llm = LucidLM(pretrained=str(checkpoint("llama3"))).llm
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)
    with pytest.raises(EvaluationError, match=r"pip install lucidlm\[eval\]"):
        LucidLM(llm)
