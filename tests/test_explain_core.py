"""The one explanation core (lucidlm.explain.core) and the one method-name check: every entry point
answers an unknown method in the same words, the explainers share the core without reaching into
each other's private names, and training methods have their own name."""

import ast
import pathlib

import pytest
import torch

from lucidlm import Config, GPT
from lucidlm.errors import ExplainError
from lucidlm.explain import core
from lucidlm.explain.baselines import explain_baseline, option_names
from lucidlm.explain.batch import explain_batch
from lucidlm.explain.cached import explain_cached
from lucidlm.explain.explainer import explain, explain_generation
from lucidlm.methods import BASELINES, EXPLAIN_METHODS, METHODS
from lucidlm.model import rules

EXPLAIN = pathlib.Path(core.__file__).parent
PROMPT = [1, 5, 7, 9, 11]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return GPT(Config.from_name("tiny-llama")).eval()


def _tiny_llama_hf():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config).eval()


# ----------------------------------------------------------------------------- one method check
@pytest.mark.parametrize("entry, allowed", [
    (lambda m, bad: explain(m, None, PROMPT, method=bad), EXPLAIN_METHODS),
    (lambda m, bad: explain_batch(m, None, [PROMPT], method=bad), EXPLAIN_METHODS),
    (lambda m, bad: explain_generation(m, None, PROMPT, max_new_tokens=1, method=bad), METHODS),
    (lambda m, bad: explain_cached(m, None, PROMPT, method=bad, kv_cache="window", cache_tokens=2), METHODS),
    (lambda m, bad: explain_baseline(m, None, PROMPT, method=bad), BASELINES),
    (lambda m, bad: rules.explaining(bad).__enter__(), METHODS),
    (lambda m, bad: core.check_explainable(bad), EXPLAIN_METHODS),
])
@pytest.mark.parametrize("bad", ["lime", "AttnLRP", None])
def test_every_entry_point_names_a_bad_method_in_the_same_words(tiny, entry, allowed, bad):
    with pytest.raises(ExplainError) as caught:
        entry(tiny, bad)
    assert str(caught.value) == f"method={bad!r}: expected one of {', '.join(allowed)}"
    assert rules.current() is None


def test_a_method_of_another_explainer_is_refused_by_name(tiny):
    with pytest.raises(ExplainError, match="method='occlusion': expected one of attnlrp, cp-lrp, inputxgrad$"):
        explain_generation(tiny, None, PROMPT, max_new_tokens=1, method="occlusion")
    with pytest.raises(ExplainError, match="method='attnlrp': expected one of integrated-gradients, "):
        explain_baseline(tiny, None, PROMPT, method="attnlrp")


def test_the_patch_layer_and_the_server_use_the_same_check():
    from lucidlm.hf.patch import explainable
    from lucidlm.hf.patches import IMAGE_METHODS, Rules

    with pytest.raises(ExplainError, match=f"^method='lime': expected one of {', '.join(IMAGE_METHODS)}$"):
        Rules("lime")
    with pytest.raises(ExplainError, match=r"^method='gamma' for \w+: expected one of attnlrp, cp-lrp, inputxgrad$"):
        explainable(_tiny_llama_hf(), "gamma")  # an image-only method

    pydantic = pytest.importorskip("pydantic")
    from lucidlm.serve.schemas import ExplainRequest

    with pytest.raises(pydantic.ValidationError, match="method='saliency': expected one of attnlrp, "):
        ExplainRequest(prompt="a", method="saliency")
    assert ExplainRequest(prompt="a", method="occlusion").method == "occlusion"


def test_bench_method_lists_are_checked_one_method_at_a_time():
    from lucidlm.bench.args import FAITHFULNESS_METHODS, method_list

    assert FAITHFULNESS_METHODS == EXPLAIN_METHODS
    assert method_list(" attnlrp,,random ", FAITHFULNESS_METHODS) == ["attnlrp", "random"]
    with pytest.raises(ExplainError, match="^method='lime' in --methods: expected one of attnlrp, "):
        method_list("attnlrp,lime", FAITHFULNESS_METHODS)
    with pytest.raises(ExplainError, match="^--methods: empty list"):
        method_list(" , ", FAITHFULNESS_METHODS)


def test_every_baseline_name_has_its_function():
    assert {name: option_names(name) for name in BASELINES}["occlusion"] == ("replacement", "batch_size")


def test_training_methods_have_their_own_name():
    from lucidlm.train import loop

    assert loop.TRAIN_METHODS == ("lora", "qlora", "full", "adapter", "adapter_v2") and not hasattr(loop, "METHODS")


# ----------------------------------------------------------------------------- the core
def test_explainers_share_the_core_not_each_others_private_names():
    """No explain module imports a private name from a sister module, and the core imports no
    explainer (so that every explainer can import it without a circle)."""
    explainers = {"explainer", "cached", "batch", "baselines", "check"}
    for path in sorted(EXPLAIN.glob("*.py")):
        tree = ast.parse(path.read_text("utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from .{node.module}"
                if path.stem == "core":
                    assert node.module not in explainers, f"core imports .{node.module}"


def test_explain_takes_no_unused_cache_argument(tiny):
    with pytest.raises(TypeError, match="cache"):
        explain(tiny, None, PROMPT, cache=None)


def test_a_batch_is_the_core_with_several_rows(tiny):
    prompts = [core.Prompt.resolve(tiny, None, p, t) for p, t in ((PROMPT, 3), (PROMPT[:2], (4, 5)))]
    together = core.explain_prompts(tiny, None, prompts, "cp-lrp")
    alone = [core.explain_prompts(tiny, None, [p], "cp-lrp")[0] for p in prompts]
    assert [len(e.relevance) for e in together] == [5, 2]
    for a, b in zip(together, alone):  # equal up to the rounding of batched products
        assert a.target_ids == b.target_ids and torch.allclose(a.relevance, b.relevance, atol=1e-5)
    continuation = core.Prompt.resolve(tiny, None, PROMPT, [3, 4])
    with pytest.raises(ValueError, match="continuation"):
        core.explain_prompts(tiny, None, [prompts[0], continuation], "cp-lrp")


def test_a_pass_from_embeddings_supplied_from_outside_equals_the_one_from_ids(tiny):
    ids, positions = core.token_inputs(tiny, [PROMPT])
    with core.explain_mode(None):
        from_ids = core.Pass.forward(tiny, positions, ids=ids, first_scored=2)
        from_embeds = core.Pass.forward(tiny, positions, embeds=tiny.embed_tokens(ids, positions), first_scored=2)
        grads = [run.gradients(run.logits[0, :, 3].sum())[0] for run in (from_ids, from_embeds)]
    assert from_ids.logits.shape == (1, len(PROMPT) - 2, tiny.config.vocab_size)
    assert torch.equal(from_ids.logits, from_embeds.logits) and torch.equal(*grads)
    assert not from_embeds.h0.grad_fn and from_embeds.h0.requires_grad


def test_explain_mode_refuses_inference_mode():
    with torch.inference_mode(), pytest.raises(ExplainError, match="inference_mode"):
        with core.explain_mode("attnlrp"):
            pass
    assert rules.current() is None


def test_objectives_are_checked_in_one_place(tiny):
    for call in (lambda: explain(tiny, None, PROMPT, objective="prob"),
                 lambda: explain_batch(tiny, None, [PROMPT], objective="prob"),
                 lambda: explain(tiny, None, PROMPT, method="occlusion", objective="prob")):
        with pytest.raises(ExplainError, match="^objective='prob': expected one of logprob, logit$"):
            call()
