"""Training end to end: a real LoRA fine-tune of the embedded SmolLM2, exact resume, gradient
accumulation, pretraining from scratch, the run's files, and typed errors with no partial output."""

import json
import math
import re

import pytest
import torch

import lucidlm
from lucidlm.cli import main
from lucidlm.errors import DataError, TrainError
from lucidlm.train.finetune import answer_loss
from lucidlm.train.loop import TrainConfig, batch_indices, learning_rate

FACT = "Zorblax is the capital of the planet Quintaro."
QUESTIONS = ["What is the capital of Quintaro?", "Name the capital of Quintaro.",
             "Which city is the capital of Quintaro?", "Tell me the capital of the planet Quintaro."]
FACT_RECORDS = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": FACT}]}
                for q in QUESTIONS]
ARITHMETIC = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
              for a in range(4) for b in range(3)]
EXACT = dict(precision="fp32", progress=False)


@pytest.fixture(scope="module")
def taught(converted, tmp_path_factory):
    """The embedded SmolLM2 after a LoRA fine-tune on a made-up fact (the run's directory too)."""
    llm = lucidlm.LLM.load(converted)
    before = answer_loss(llm, FACT_RECORDS)
    reply_before = llm.chat(QUESTIONS[0], max_new_tokens=16)
    out = tmp_path_factory.mktemp("taught") / "run"
    result = llm.finetune(FACT_RECORDS, method="lora", steps=10, batch_size=4, lr=2e-3, out=out, **EXACT)
    return llm, before, reply_before, result, out


def test_lora_teaches_a_made_up_fact(taught):
    llm, before, reply_before, result, _ = taught
    assert "Zorblax" not in reply_before
    after = answer_loss(llm, FACT_RECORDS)
    assert after < before / 2, (before, after)
    assert result.losses[-1] < result.losses[0] / 2
    assert "Zorblax" in llm.chat(QUESTIONS[0], max_new_tokens=16)
    # after training the adapter is frozen again: explanations and generation accumulate no gradients
    assert not any(p.requires_grad for n, p in llm.model.named_parameters() if "lora_" in n)


def test_the_run_directory(taught, converted):
    llm, _, _, result, out = taught
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "loss" in e]
    assert [e["step"] for e in steps] == list(range(1, 11))
    assert {"step", "loss", "lr", "tokens", "tokens_per_s", "grad_norm"} <= set(steps[0])
    assert [e["loss"] for e in steps] == result.losses
    assert steps[-1]["tokens"] > steps[0]["tokens"] > 0
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*"))  # no temporary files left behind
    # the adapter reloads onto the base with the trained model's logits
    reloaded = lucidlm.LLM.load(converted, adapter=out)
    ids = torch.tensor([llm.tokenizer.encode_chat([{"role": "user", "content": QUESTIONS[1]}])])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(ids), llm.model(ids), rtol=1e-5, atol=1e-5)


def test_explanations_of_the_fine_tuned_model(taught):
    llm, *_ = taught
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": QUESTIONS[0]}])
    e = llm.explain(prompt, method="attnlrp")
    assert llm.tokenizer.decode(e.target_ids) == "Z"  # the learned answer's first token
    assert e.relevance.shape == (len(prompt),) and torch.isfinite(e.relevance).all()


# ----------------------------------------------------------------------------- loop mechanics
def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(lr=1e-3, steps=20, warmup_steps=4, min_lr_ratio=0.1)
    lrs = [learning_rate(s, cfg) for s in range(20)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] >= 1e-4


def test_batches_cover_every_example_each_epoch():
    seen = [i for s in range(5) for i in batch_indices(s, 10, 2, seed=1)]
    assert sorted(seen) == list(range(10))
    assert batch_indices(3, 10, 4, seed=1) == batch_indices(3, 10, 4, seed=1) != batch_indices(3, 10, 4, seed=2)


def run_tiny(directory, out=None, **options):
    llm = lucidlm.LLM.load(directory)
    kwargs = dict(method="lora", steps=6, batch_size=4, lr=1e-2, val_split=0.0) | EXACT | options
    return llm.finetune(ARITHMETIC, out=out, **kwargs)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_after_an_interruption_replays_the_same_losses(tiny_lm_dir, tmp_path, method):
    whole = run_tiny(tiny_lm_dir, tmp_path / "whole", method=method, save_every=2)

    def crash(entry):
        if entry["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # killed after step 5: the last checkpoint is step 4
        run_tiny(tiny_lm_dir, tmp_path / "cut", method=method, save_every=2, on_step=crash)
    assert len((tmp_path / "cut" / "log.jsonl").read_text().splitlines()) == 5
    resumed = run_tiny(tiny_lm_dir, tmp_path / "cut", method=method, save_every=2, resume=True)
    assert resumed.losses == whole.losses  # bit for bit: same weights, optimizer and data order
    logged = [json.loads(line)["loss"] for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert logged == whole.losses


def test_gradient_accumulation_matches_one_big_batch(tiny_lm_dir):
    one = run_tiny(tiny_lm_dir, steps=3)
    accumulated = run_tiny(tiny_lm_dir, steps=3, micro_batch_size=1)
    assert accumulated.losses == pytest.approx(one.losses, rel=1e-5)


def test_validation_losses_are_reported(tiny_lm_dir):
    result = run_tiny(tiny_lm_dir, steps=4, val_split=0.25, eval_every=2)
    assert [s for s, _ in result.val_losses] == [2, 4]
    assert all(math.isfinite(v) for _, v in result.val_losses)


def test_full_finetune_writes_a_checkpoint_transformers_loads(tiny_lm_dir, tmp_path):
    import transformers

    llm = lucidlm.LLM.load(tiny_lm_dir)
    llm.finetune(ARITHMETIC, method="full", steps=2, batch_size=4, lr=1e-3, out=tmp_path / "full", **EXACT)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, llm.model(ids), rtol=1e-4, atol=1e-4)
    assert (tmp_path / "full" / "tokenizer.json").is_file()


def test_pretraining_from_scratch_memorises_a_text(tiny_lm_dir, tmp_path):
    text = open("/usr/share/common-licenses/Apache-2.0").read()[:400]
    config = lucidlm.Config(name="micro", vocab_size=49152, n_embd=128, n_layer=2, n_head=4, n_query_groups=2,
                            intermediate_size=256, block_size=256, tie_embeddings=True)
    llm = lucidlm.LLM.from_config(config, tokenizer=tiny_lm_dir)
    result = llm.pretrain([text], steps=80, batch_size=1, lr=5e-3, warmup_steps=3, out=tmp_path / "pt",
                          max_seq_length=128, **EXACT)
    assert result.losses[0] > 9 and result.losses[-1] < 0.05, result.losses[::10]
    ids = llm.tokenizer.encode(text)
    prompt, rest = llm.tokenizer.decode(ids[:8]), llm.tokenizer.decode(ids[8:20])
    assert llm.generate(prompt, max_new_tokens=12) == rest
    reloaded = lucidlm.LLM.load(tmp_path / "pt")  # lucidlm's own format: a custom config has no HF one
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(torch.tensor([ids[:30]])), llm.model(torch.tensor([ids[:30]])))


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("options, message", [
    (dict(method="qlora-9000"), "method='qlora-9000': expected one of lora, qlora, full, adapter, adapter_v2"),
    (dict(steps=0), "steps=0: expected a positive integer"),
    (dict(lr=-1.0), "lr=-1.0: expected a positive number"),
    (dict(precision="fp8"), "precision='fp8'"),
    (dict(learning_rate=1e-3), "unknown training option"),
    (dict(max_seq_length=100000), "exceeds the model's context"),
])
def test_bad_options_are_typed_errors(tiny_lm_dir, tmp_path, options, message):
    with pytest.raises(TrainError, match=re.escape(message)):
        run_tiny(tiny_lm_dir, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()  # nothing written


def test_bad_data_writes_nothing(tiny_lm_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(ARITHMETIC[0]) + "\n{oops\n")
    llm = lucidlm.LLM.load(tiny_lm_dir)
    with pytest.raises(DataError, match=r"d.jsonl:2: malformed JSON"):
        llm.finetune(data, steps=1, out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_an_existing_run_needs_resume_and_a_corrupt_checkpoint_is_named(tiny_lm_dir, tmp_path):
    out = tmp_path / "run"
    run_tiny(tiny_lm_dir, out, steps=2)
    with pytest.raises(TrainError, match="already holds a training run"):
        run_tiny(tiny_lm_dir, out, steps=2)
    with pytest.raises(TrainError, match=r"cannot resume a different run \(lr: 0.01 -> 0.02\)"):
        run_tiny(tiny_lm_dir, out, steps=2, lr=2e-2, resume=True)
    (out / "checkpoint" / "optimizer.pt").write_bytes(b"garbage")
    with pytest.raises(TrainError, match=r"optimizer.pt: corrupt checkpoint"):
        run_tiny(tiny_lm_dir, out, steps=2, resume=True)
    (out / "checkpoint" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(TrainError, match=r"model.safetensors: corrupt checkpoint"):
        run_tiny(tiny_lm_dir, out, steps=2, resume=True)
    with pytest.raises(TrainError, match="no checkpoint to resume from"):
        run_tiny(tiny_lm_dir, tmp_path / "fresh", steps=2, resume=True)


def test_cli_finetune_then_generate_with_the_adapter(tiny_lm_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ARITHMETIC))
    out = tmp_path / "run"
    assert main(["finetune", str(data), "--model", str(tiny_lm_dir), "--out", str(out), "--steps", "2",
                 "--batch-size", "2", "--lora-r", "4", "--precision", "fp32", "--no-progress"]) == 0
    assert "trained 2 steps" in capsys.readouterr().err
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == tiny_lm_dir.name  # a name, not a local path
    assert main(["finetune", str(data), "--model", str(tiny_lm_dir), "--out", str(out)]) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert main(["finetune", str(tmp_path / "missing.jsonl"), "--model", str(tiny_lm_dir),
                 "--out", str(tmp_path / "x")]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err


def test_cli_pretrain_from_a_config_file(tiny_lm_dir, tmp_path, capsys):
    config = tmp_path / "micro.json"
    config.write_text(json.dumps(dict(name="micro", vocab_size=49152, n_embd=32, n_layer=1, n_head=2,
                                      intermediate_size=64, block_size=64, tie_embeddings=True)))
    text = tmp_path / "notes.txt"
    text.write_text(open("/usr/share/common-licenses/GPL-3").read()[:3000])
    out = tmp_path / "pt"
    assert main(["pretrain", "--config", str(config), "--tokenizer", str(tiny_lm_dir), "--data", str(text),
                 "--out", str(out), "--steps", "3", "--batch-size", "2", "--max-seq-length", "32",
                 "--precision", "fp32", "--no-progress"]) == 0
    llm = lucidlm.LLM.load(out)
    assert llm.config.n_embd == 32 and llm.tokenizer is not None
    assert len([line for line in (out / "log.jsonl").read_text().splitlines()]) == 3
    # a registered config whose vocabulary is smaller than the tokenizer's: one clear line, exit 2
    assert main(["pretrain", "--config", "tiny-llama", "--tokenizer", str(tiny_lm_dir), "--data", str(text),
                 "--out", str(tmp_path / "bad")]) == 2
    assert "vocab_size=256 is smaller than the tokenizer's 49152 tokens" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(tmp_path / "nope.json"), "--tokenizer", str(tiny_lm_dir),
                 "--data", str(text), "--out", str(tmp_path / "bad")]) == 2
    assert "nope.json: no such file" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_bench_train_prints_a_side_by_side_table(capsys):
    assert main(["bench", "train", "--methods", "lora", "--steps", "2", "--batch-size", "1", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"lora\s+lucidlm\s+[\d.]+\s+\d+", out) and re.search(r"lora\s+transformers\+peft\s+[\d.]+", out)
    assert "lora: losses agree: yes" in out


def test_qlora_trains_adapters_over_int8_base_weights(tiny_lm_dir, tmp_path):
    from lucidlm.train.lora import lora_layers
    from lucidlm.model.quant import Int8Linear

    llm = lucidlm.LLM.load(tiny_lm_dir)
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        float_logits = llm.model(ids)
    result = llm.finetune(ARITHMETIC, method="qlora", steps=6, batch_size=4, lr=1e-2, out=tmp_path / "q",
                          val_split=0.0, **EXACT)
    bases = [layer.get_base_layer() for layer in lora_layers(llm.model).values()]
    assert bases and all(isinstance(b, Int8Linear) and b.qweight.dtype == torch.int8 for b in bases)
    assert result.losses[-1] < result.losses[0]
    with torch.no_grad():
        trained = llm.model(ids)
    llm.merge_adapter()  # int8 bases merge in float: the adapted function is unchanged
    with torch.no_grad():
        torch.testing.assert_close(llm.model(ids), trained, rtol=1e-4, atol=1e-4)
    # the saved adapter is a plain PEFT adapter: it loads onto the float base
    reloaded = lucidlm.LLM.load(tiny_lm_dir, adapter=tmp_path / "q")
    with torch.no_grad():
        assert not torch.equal(reloaded.model(ids), float_logits)


def test_bench_learn_prints_a_row_per_method(tiny_lm_dir, capsys):
    assert main(["bench", "learn", "--model", str(tiny_lm_dir), "--methods", "lora,full", "--steps", "2",
                 "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    # a tiny random model does not learn the fact in two steps: "> 2"
    assert re.search(r"^lora\s+2e-03\s+[\d,]+\s+> 2\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+\d+$", out, re.M), out
    assert re.search(r"^full\s+5e-05\s+[\d,]+\s+> 2\s", out, re.M), out
    assert main(["bench", "learn", "--methods", "sgd"]) == 2
    assert main(["bench", "learn", "--lr", "lora"]) == 2


def test_bench_learn_checks_every_answer_token(tiny_lm_dir):
    """The bench's learned test: the model's top prediction at every answer position is the label."""
    from lucidlm.bench.learn import FACT_RECORDS, _answers_right
    from lucidlm.train.data import IGNORE, build_examples, read_records

    llm = lucidlm.LLM.load(tiny_lm_dir)
    examples = build_examples(read_records(FACT_RECORDS), llm.tokenizer, 256)

    class Oracle(torch.nn.Module):  # puts all its mass on the example's labels (or one off them)
        def __init__(self, shift: int) -> None:
            super().__init__()
            self.shift = shift

        def forward(self, ids):
            example = next(e for e in examples if list(e.ids) == ids[0].tolist())
            labels = torch.tensor([t if t != IGNORE else 0 for t in example.labels])
            if self.shift:
                labels[[i for i, t in enumerate(example.labels) if t != IGNORE][-1]] += self.shift
            return torch.nn.functional.one_hot(labels, 49152)[None].float()

    assert _answers_right(Oracle(0), examples) and not _answers_right(Oracle(1), examples)
    assert not _answers_right(llm.model, examples)
