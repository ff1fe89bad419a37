"""lucidlm.hf: explain ``transformers`` models in place (tiny random configs, CPU, no downloads).

* parity: the patched ``transformers`` model and lucidlm's native model (same weights through
  ``lucidlm.LLM.load``) give the same relevances, for both methods: two independent code paths;
* conservation: with biases at zero, CP-LRP relevances sum to the explained logit (float64);
* isolation: patching one instance changes nothing else, and removing it restores every bit.
"""

from __future__ import annotations

import importlib
import pathlib
import re
import warnings

import pytest
import torch
import transformers as T
from torch import nn
from torch.nn import functional as F

from lucidlm import hf
from lucidlm.errors import ExplainError, PatchError
from lucidlm.explain.explanation import Explanation
from lucidlm.hf.models.transformers_lm import FAMILIES, modeling_module

IDS = [1, 17, 5, 42, 9, 23, 7, 11]
_BASE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)

CONFIGS = {
    "llama": lambda: T.LlamaConfig(**_BASE, tie_word_embeddings=False),
    "qwen2": lambda: T.Qwen2Config(**_BASE, tie_word_embeddings=True),
    "qwen3": lambda: T.Qwen3Config(**_BASE, head_dim=16, tie_word_embeddings=False),
    "gemma3": lambda: T.Gemma3TextConfig(**_BASE, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                                         layer_types=["sliding_attention", "full_attention"]),
    "gemma3-softcap": lambda: T.Gemma3TextConfig(**_BASE, head_dim=16, sliding_window=4,
                                                 query_pre_attn_scalar=16, final_logit_softcapping=3.0,
                                                 layer_types=["sliding_attention", "full_attention"]),
    "gpt2": lambda: T.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                 bos_token_id=1, eos_token_id=2),
    "mistral": lambda: T.MistralConfig(**_BASE, sliding_window=4, head_dim=16),
    "phi3": lambda: T.Phi3Config(**_BASE),
}
PARITY = ["llama", "qwen2", "qwen3", "gemma3", "gemma3-softcap", "gpt2"]
METHODS = ["attnlrp", "cp-lrp"]


def _perturb(model: nn.Module, seed: int) -> nn.Module:
    # random init leaves norms at 1 and biases at 0: perturb every tensor so no feature hides
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def causal_lm(name: str, attn: str = "eager", seed: int = 0, dtype=None) -> nn.Module:
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation=attn)
    model = _perturb(model, seed)
    return model.to(dtype) if dtype is not None else model


def bert(head: str, seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    config = T.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=64, num_labels=3)
    cls = T.BertForSequenceClassification if head == "cls" else T.BertForMaskedLM
    return _perturb(cls(config), seed).to(dtype)


def zero_biases(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def conservation_error(model: nn.Module, ids, **kw) -> float:
    a = hf.attribute(model, ids, method="cp-lrp", **kw)
    assert a.relevance.dtype == torch.float64
    return abs(float(a.relevance.sum() - a.logit)) / abs(float(a.logit))


# ----------------------------------------------------------------------------- registry


def test_table_names_real_transformers_classes():
    """Every class the built-in table names exists in the installed transformers."""
    for family in FAMILIES:
        module = importlib.import_module(modeling_module(family.package))
        for suffix in ["PreTrainedModel", *family.modules]:
            assert hasattr(module, family.prefix + suffix), f"{family.name}: {family.prefix}{suffix} missing"


def test_supported_lists_the_issue_models():
    names = hf.supported()
    for family in ["Llama", "Qwen2", "Qwen3", "Gemma 3", "GPT-2", "BERT", "Mistral", "Phi-3"]:
        assert family in names
    assert any("ViT" in n for n in names)


def test_builtin_families_leave_nothing_unpatched():
    with warnings.catch_warnings():
        warnings.simplefilter("error", hf.UnpatchedModuleWarning)
        for model in [*(causal_lm(name) for name in CONFIGS), bert("cls"), bert("mlm")]:
            hf.explainable(model).remove()


# ----------------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """name -> (transformers model, lucidlm.LLM of the same weights), built once."""
    import lucidlm

    cache = {}

    def get(name: str):
        if name not in cache:
            model = causal_lm(name)
            directory = tmp_path_factory.mktemp(name)
            model.save_pretrained(directory)
            cache[name] = (model, lucidlm.LLM.load(directory))
        return cache[name]

    return get


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", PARITY)
def test_patched_transformers_matches_native(native, name, method):
    model, llm = native(name)
    target = int(model(torch.tensor([IDS])).logits[0, -1].argmax())
    ours = hf.explain(model, IDS, target=target, method=method)
    theirs = llm.explain(IDS, target=target, method=method)
    assert ours.target_ids == theirs.target_ids == [target]
    assert ours.target_logit == pytest.approx(theirs.target_logit, rel=1e-4, abs=1e-5)
    assert rel_err(ours.relevance, theirs.relevance) < 1e-4, (ours.relevance, theirs.relevance)


# ----------------------------------------------------------------------------- conservation


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llama_cp_lrp_conserves_the_logit(attn):
    assert conservation_error(causal_lm("llama", attn, dtype=torch.float64), IDS) < 1e-4


@pytest.mark.parametrize("name", ["mistral", "phi3", "qwen3", "gemma3-softcap"])
def test_more_families_conserve_with_zero_biases(name):
    model = zero_biases(causal_lm(name, dtype=torch.float64))
    for method in METHODS:
        assert torch.isfinite(hf.attribute(model, IDS, method=method).relevance).all()
    assert conservation_error(model, IDS) < 1e-4


def test_bert_classifier_conserves():
    model = zero_biases(bert("cls"))
    assert conservation_error(model, IDS) < 1e-4
    assert conservation_error(model, IDS, target=2) < 1e-4


def test_bert_masked_lm_conserves_at_the_mask():
    model = zero_biases(bert("mlm"))
    ids = [1, 17, 5, 4, 9, 2]
    a = hf.attribute(model, ids, method="cp-lrp", mask_token_id=4)
    assert a.position == 3
    assert conservation_error(model, ids, mask_token_id=4) < 1e-4
    with pytest.raises(ExplainError, match="mask"):
        hf.attribute(model, ids)  # which [MASK]? no tokenizer, no mask_token_id


def test_attnlrp_is_not_plain_gradient():
    """The rules act: AttnLRP, CP-LRP and input×gradient give three different answers."""
    model = causal_lm("llama", dtype=torch.float64)
    r = {m: hf.attribute(model, IDS, target=3, method=m).relevance for m in [*METHODS, "inputxgrad"]}
    assert not torch.allclose(r["attnlrp"], r["cp-lrp"])
    assert not torch.allclose(r["cp-lrp"], r["inputxgrad"])


# ----------------------------------------------------------------------------- isolation


def _logits_and_grad(model: nn.Module, ids) -> tuple[torch.Tensor, torch.Tensor]:
    embeds = model.get_input_embeddings()(torch.tensor([ids])).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    (grad,) = torch.autograd.grad(logits[0, -1].square().sum(), embeds)
    return logits.detach(), grad


def _attention_registry_snapshot():
    """transformers' attention registry, less the one key lucidlm adds (harmless: only configs
    that name it select it)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from lucidlm.hf.attention import ATTENTION_KEY

    return ({k: v for k, v in ALL_ATTENTION_FUNCTIONS._global_mapping.items() if k != ATTENTION_KEY},
            dict(ALL_ATTENTION_FUNCTIONS._local_mapping))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_patch_touches_one_instance_and_removal_restores_every_bit(attn):
    a, b = causal_lm("qwen3", attn), causal_lm("qwen3", attn)
    attention_cls = type(a.model.layers[0].self_attn)
    class_forward, registry = attention_cls.forward, _attention_registry_snapshot()
    before_a, before_b = _logits_and_grad(a, IDS), _logits_and_grad(b, IDS)

    handle = hf.explainable(a, "cp-lrp")
    patched = _logits_and_grad(a, IDS)
    # a's forward is the same function of its input (up to rounding); only its backward changed
    assert torch.allclose(patched[0], before_a[0], atol=1e-5)
    assert not torch.allclose(patched[1], before_a[1])
    # b, the class, the attention registry and a's config are untouched
    for got, want in zip(_logits_and_grad(b, IDS), before_b):
        assert torch.equal(got, want)
    assert attention_cls.forward is class_forward
    assert _attention_registry_snapshot() == registry
    assert a.config._attn_implementation == attn
    assert b.model.layers[0].self_attn.config._attn_implementation == attn

    handle.remove()
    for got, want in zip(_logits_and_grad(a, IDS), before_a):
        assert torch.equal(got, want)
    assert not any("forward" in vars(m) for m in a.modules())


def test_context_manager_restores_and_explain_leaves_no_trace():
    model = causal_lm("gemma3-softcap")
    before = _logits_and_grad(model, IDS)
    with hf.explainable(model, "attnlrp") as handle:
        assert hf.active(model) is handle
        e = hf.explain(model, IDS)  # reuses the live handle
        assert e.method == "attnlrp"
        with pytest.raises(ExplainError, match="attnlrp"):
            hf.explain(model, IDS, method="cp-lrp")
        with pytest.raises(PatchError, match="already explainable"):
            hf.explainable(model, "cp-lrp")
    assert handle.removed and hf.active(model) is None
    model.train()
    hf.explain(model, IDS, method="cp-lrp")  # patches for the call only, in eval mode
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    for got, want in zip(_logits_and_grad(model, IDS), before):
        assert torch.equal(got, want)


# ----------------------------------------------------------------------------- errors, warnings


class Mystery(nn.Module):
    def forward(self, x):
        return x


def test_unsupported_model_names_itself_and_the_supported_list():
    with pytest.raises(PatchError) as info:
        hf.explainable(Mystery())
    message = str(info.value)
    assert "Mystery" in message and "Llama" in message and "GPT-2" in message and "register" in message
    with pytest.raises(PatchError, match="Bloom"):  # no native lucidlm family, so not registered
        hf.explain(T.BloomForCausalLM(T.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2)), IDS)


def test_unknown_method_is_an_explain_error():
    with pytest.raises(ExplainError, match="gamma"):
        hf.explainable(causal_lm("llama"), "gamma")  # an image-only method


# ----------------------------------------------------------------------------- register()


class TinyNorm(nn.Module):
    """An RMSNorm under a name the registry does not know."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = 1e-6

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class TinyAttention(nn.Module):
    def __init__(self, size: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(size, 3 * size)
        self.out = nn.Linear(size, size)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).chunk(3, -1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class TinyMLP(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(size, 2 * size), nn.Linear(size, 2 * size), nn.Linear(2 * size, size)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class TinyBlock(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.norm1, self.attn = TinyNorm(size), TinyAttention(size, 2)
        self.norm2, self.mlp = TinyNorm(size), TinyMLP(size)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 64, size: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, size)
        self.blocks = nn.ModuleList(TinyBlock(size) for _ in range(2))
        self.norm, self.head = TinyNorm(size), nn.Linear(size, vocab)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


@pytest.fixture
def registered_tiny():
    hf.register(TinyLM, {TinyAttention: hf.patches.sdpa_attention,
                         TinyNorm: hf.patches.rms_norm(),
                         TinyMLP: hf.patches.glu_mlp(gate="w1", up="w3", down="w2", act="act")},
                name="TinyLM", blocks="blocks")
    yield
    hf.unregister(TinyLM)


def test_register_a_custom_model(registered_tiny):
    torch.manual_seed(0)
    model = zero_biases(TinyLM().double().eval())
    assert "TinyLM" in hf.supported()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything is covered: no UnpatchedModuleWarning
        assert conservation_error(model, IDS[:5]) < 1e-4
        e = hf.explain(model, IDS[:5])
    assert isinstance(e, Explanation) and e.tokens == [str(i) for i in IDS[:5]]


def test_unpatched_norm_is_named_in_a_warning():
    hf.register(TinyLM, {TinyAttention: hf.patches.sdpa_attention,
                         TinyMLP: hf.patches.glu_mlp(gate="w1", up="w3", down="w2", act="act")})
    try:
        with pytest.warns(hf.UnpatchedModuleWarning, match=r"blocks\.0\.norm1 \(TinyNorm\)"):
            hf.explainable(TinyLM()).remove()
    finally:
        hf.unregister(TinyLM)


# ----------------------------------------------------------------------------- explanation output


def _word_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    words = ["[PAD]", "<s>", "</s>", "[UNK]", "[MASK]", "the", "capital", "of", "france", "is", "paris"]
    vocab = {w: i for i, w in enumerate(words)}
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]",
                                     mask_token="[MASK]")


def test_explain_with_tokenizer_renders_like_native(tmp_path):
    tok = _word_tokenizer()
    model = causal_lm("llama")
    e = hf.explain(model, tok, target="paris", text="the capital of france is")
    assert e.tokens == ["the", "capital", "of", "france", "is"] and e.prompt == "the capital of france is"
    assert e.target == "paris" and e.target_ids == [10]
    assert "paris" in e.to_terminal(color=False) and "<html" in e.to_html().lower()
    assert e.to_png()[:4] == b"\x89PNG"
    assert Explanation.from_json(e.to_json()) == e
    # a tokenizer's dict output works as well, with tokenizer= for the token strings
    e2 = hf.explain(model, tok("the capital of france is", return_tensors="pt"), target=10, tokenizer=tok)
    assert torch.equal(e2.relevance, e.relevance)


def test_bert_masked_lm_with_tokenizer_and_classifier_labels():
    tok = _word_tokenizer()
    e = hf.explain(bert("mlm", dtype=torch.float32), tok, text="the capital of [MASK] is", method="cp-lrp")
    assert len(e.tokens) == 5 and e.target == tok.decode([e.target_ids[0]])
    classifier = bert("cls", dtype=torch.float32)
    classifier.config.id2label = {0: "neg", 1: "neutral", 2: "pos"}
    classifier.config.label2id = {"neg": 0, "neutral": 1, "pos": 2}
    e = hf.explain(classifier, [1, 5, 6, 7, 2], target="pos")
    assert e.target == "pos" and e.target_ids == [2]


def test_gpt2_and_bert_work_with_sdpa_and_eager_alike():
    for attn in ["eager", "sdpa"]:
        torch.manual_seed(0)
        model = _perturb(T.GPT2LMHeadModel._from_config(CONFIGS["gpt2"](), attn_implementation=attn), 0)
        r = hf.attribute(model, IDS, target=5, method="attnlrp").relevance
        if attn == "eager":
            first = r
    assert rel_err(r, first) < 1e-5


def test_bad_inputs_are_explain_errors():
    model = causal_lm("llama")
    with pytest.raises(ExplainError, match="one sequence"):
        hf.explain(model, torch.tensor([IDS, IDS]))
    with pytest.raises(ExplainError, match="tokenizer"):
        hf.explain(model, "the capital")
    with pytest.raises(ExplainError, match="target"):
        hf.explain(model, IDS, target=10_000)


def test_the_guide_runs(tmp_path, monkeypatch):
    """docs/explaining-new-models.md: its Python blocks, in order, as one script."""
    guide = pathlib.Path(__file__).parent.parent / "docs" / "explaining-new-models.md"
    code = "\n".join(re.findall(r"```python\n(.*?)```", guide.read_text(), flags=re.DOTALL))
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "guide"}
    try:
        exec(compile(code, str(guide), "exec"), namespace)
    finally:
        for name in ("MyLM", "HandmadeLM"):
            if name in namespace:
                hf.unregister(namespace[name])
        hf.unregister("transformers.models.helium.modeling_helium.HeliumPreTrainedModel")
    assert (tmp_path / "my_lm.html").exists()
