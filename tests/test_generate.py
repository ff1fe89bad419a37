"""Generation on the embedded SmolLM2 model equals transformers' greedy tokens from the same GGUF."""

import pytest
import torch
import transformers

import lucidlm
from lucidlm.generate import Sampling, generate_ids, left_pad, sample

N_NEW = 40


@pytest.fixture(scope="module")
def llm():
    return lucidlm.LLM.load()


@pytest.fixture(scope="module")
def hf_model(llm):
    from pathlib import Path

    gguf = Path(llm.source)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def our_greedy(llm, ids: list[int], n: int) -> list[int]:
    return [step[0] for step in generate_ids(llm.model, [ids], n)]


@pytest.mark.parametrize("kind", ["plain", "chat"])
def test_greedy_tokens_equal_transformers(llm, hf_model, kind):
    if kind == "plain":
        ids = llm.tokenizer.encode("The three primary colours are red, yellow and")
    else:
        ids = llm.tokenizer.encode_chat([{"role": "user", "content": "Write a short poem about the sea."}])
    assert our_greedy(llm, ids, N_NEW) == hf_greedy(hf_model, ids, N_NEW)


def test_generate_text_api(llm):
    text = llm.generate("The capital of France is", max_new_tokens=8)
    assert isinstance(text, str) and text.strip()
    streamed = "".join(llm.generate("The capital of France is", max_new_tokens=8, stream=True))
    assert streamed == text
    assert llm.generate("The capital of France is", max_new_tokens=8, stop=text.strip()[:3]) in text


def test_chat_reply_stops_at_end_of_turn(llm):
    reply = llm.chat([{"role": "user", "content": "Say hello."}], max_new_tokens=48)
    assert reply and "<|im_end|>" not in reply and "<|im_start|>" not in reply


def test_batched_generation_equals_one_by_one(llm):
    prompts = ["Once upon a time", "The quick brown fox jumps over the lazy dog. Then the"]
    batched = llm.generate(prompts, max_new_tokens=12)
    assert batched == [llm.generate(p, max_new_tokens=12) for p in prompts]


def test_sampling_is_seeded_and_respects_top_k():
    logits = torch.randn(3, 50)
    a = sample(logits, Sampling(temperature=1.0, seed=0), torch.Generator().manual_seed(0))
    b = sample(logits, Sampling(temperature=1.0, seed=0), torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    top1 = sample(logits, Sampling(temperature=5.0, top_k=1), torch.Generator().manual_seed(1))
    assert torch.equal(top1, logits.argmax(-1))
    nucleus = sample(logits, Sampling(temperature=1.0, top_p=1e-6), torch.Generator().manual_seed(2))
    assert torch.equal(nucleus, logits.argmax(-1))


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_k=0), dict(top_p=1.5)])
def test_bad_sampling_arguments(kwargs):
    with pytest.raises(ValueError):
        Sampling(**kwargs)


def test_left_pad_positions():
    ids, pos = left_pad([[5, 6, 7], [8]])
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert pos.tolist() == [[0, 1, 2], [-1, -1, 0]]
