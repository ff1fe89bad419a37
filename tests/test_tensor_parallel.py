"""Tensor parallel (lucidlm.model.parallel): under torchrun with 2 gloo processes, generation (greedy
tokens, through every cache policy that decides on all KV groups) and explanations (AttnLRP, CP-LRP,
through a KV cache) equal one process's; the CLI's --tensor-parallel on generate, explain and
explain-dataset writes one process's output; bad input gets typed errors."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from lucidlm import LLM, Config, GPT
from lucidlm.cli import main
from lucidlm.errors import ParallelError
from lucidlm.explain.dataset import read_results
from lucidlm.model.parallel import ColumnParallelLinear, RowParallelLinear, Shard, check_divisible, check_supported
from cli_probe import probe
from torchrun_util import TORCHRUN

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKER = pathlib.Path(__file__).resolve().parent / "tp_worker.py"
needs_torchrun = pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")


def torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Two gloo processes with one thread each, this tree on their path."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def close(a, b) -> bool:
    """Equal up to float32 summation order (a sharded matmul adds its partial sums in another order)."""
    a, b = torch.tensor(a), torch.tensor(b)
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


def hf_llama(directory: pathlib.Path, heads: int = 4, kv_heads: int = 2, intermediate: int = 64) -> pathlib.Path:
    """A random tiny Llama saved by transformers (no tokenizer)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=8 * heads, intermediate_size=intermediate,
                                      num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


# ---------------------------------------------------------------- two processes equal one
@pytest.fixture(scope="module")
def tp_results(tiny_lm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    done = torchrun(str(WORKER), str(tiny_lm_dir), str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def one_process(tiny_lm_dir):
    sys.path.insert(0, str(WORKER.parent))
    import tp_worker

    llm = LLM.load(tiny_lm_dir)
    llm.model.eval()
    return tp_worker.results(llm)


@needs_torchrun
def test_each_process_holds_half_of_the_heads(tp_results):
    assert [(r["n_head"], r["full_n_head"]) for r in tp_results] == [(2, 4), (2, 4)]


@needs_torchrun
def test_greedy_generation_equals_one_process_through_every_policy(tp_results, one_process):
    for found in tp_results:
        assert found["generate"] == one_process["generate"]
    assert len(set(one_process["generate"].values())) > 1  # the policies evicted: their generations differ


@needs_torchrun
def test_every_process_keeps_the_tokens_one_process_keeps(tp_results, one_process):
    """Policies that score by the mean over all KV groups see every process's groups."""
    for found in tp_results:
        assert found["kept"] == one_process["kept"]
    assert all(len(layer) == 8 for kept in one_process["kept"].values() for layer in kept)  # it evicted


@needs_torchrun
def test_per_head_policies_decide_for_each_process_own_groups(tp_results, one_process):
    """heads=each: every process keeps, for its own KV groups, what one process keeps for them."""
    for policy, whole in one_process["kept_by_head"].items():
        for layer, heads in enumerate(whole):
            assert [h for found in tp_results for h in found["kept_by_head"][policy][layer]] == heads
            assert all(len(h) == 8 for h in heads)  # it evicted
    assert any(layer[0] != layer[1] for layer in one_process["kept_by_head"]["knorm(heads=each)"])


@needs_torchrun
@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp", "attnlrp-h2o", "attention-rollout", "integrated-gradients",
                                    "generation"])
def test_relevances_equal_one_process(tp_results, one_process, method):
    want = one_process[method]
    for found in tp_results:
        assert found[method]["target"] == want["target"]
        assert close(found[method]["relevance"], want["relevance"])
    # the embeddings are replicated and the relevance is all-reduced: every process holds the same numbers
    assert tp_results[0][method] == tp_results[1][method]


@needs_torchrun
def test_latent_relevances_cover_every_head_and_neuron(tp_results, one_process):
    want = one_process["latent"]
    assert len(want["layers.0.attn"]) == 4 and len(want["layers.0.mlp"]) == 64  # the whole model's
    for found in tp_results:
        assert found["latent"].keys() == want.keys()
        assert all(close(found["latent"][key], want[key]) for key in want)


@needs_torchrun
def test_cli_generate_and_explain_print_one_process_output(tiny_lm_dir, tmp_path, capsys):
    generate = ["generate", "Once upon a time", "--model", str(tiny_lm_dir), "--max-new-tokens", "10"]
    assert main(generate) == 0
    want = capsys.readouterr().out
    done = torchrun("-m", "lucidlm", *generate, "--tensor-parallel")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == want  # the first process prints, once
    explain = ["explain", "Once upon a time", "--model", str(tiny_lm_dir), "--method", "cp-lrp"]
    assert main(explain + ["--json", str(tmp_path / "one.json")]) == 0
    done = torchrun("-m", "lucidlm", *explain, "--json", str(tmp_path / "two.json"), "--tensor-parallel")
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["target_ids"] == one["target_ids"] and close(two["relevance"], one["relevance"])


@needs_torchrun
def test_cli_explain_dataset_explains_every_record_once(tiny_lm_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Hello there", "The sky is", "One two three"]))
    args = ["explain-dataset", str(data), "--model", str(tiny_lm_dir), "--shard-size", "2", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    done = torchrun("-m", "lucidlm", *args, "--out", str(tmp_path / "two"), "--tensor-parallel")
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = list(read_results(tmp_path / "one")), list(read_results(tmp_path / "two"))
    assert [r["id"] for r in two] == [r["id"] for r in one] == [0, 1, 2]  # not split between the processes
    for a, b in zip(one, two):
        assert b["target_ids"] == a["target_ids"] and close(b["relevance"], a["relevance"])
    assert done.stderr.count("explained 3 records") == 1  # the first process reports, and counts each once


# ---------------------------------------------------------------- bad input
def test_load_without_a_process_group_is_a_typed_error(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ParallelError, match="tensor_parallel=True needs a process group: run under torchrun"):
        LLM.load(hf_llama(tmp_path), tensor_parallel=True)


def test_tensor_parallel_with_a_device_map_is_refused_before_loading(tmp_path):
    missing = tmp_path / "not-read"  # the refusal comes before the checkpoint is looked at
    with pytest.raises(ParallelError, match="tensor_parallel=True and device_map= are exclusive"):
        LLM.load(missing, tensor_parallel=True, device_map={"layers": "cpu"})


@pytest.mark.parametrize("command", [["generate", "hi"], ["explain", "hi"], ["explain-dataset", "d.jsonl", "--out", "o"]])
def test_cli_without_torchrun_exits_2_with_one_line_before_torch(command):
    found, err = probe(*command, "--tensor-parallel", unset=("WORLD_SIZE",))
    assert found["status"] == 2 and found["heavy"] == []
    assert "--tensor-parallel needs the process group torchrun starts" in err and err.count("\n") == 1


@pytest.mark.parametrize("fields, size, message", [
    (dict(n_head=6, n_query_groups=2), 4, "n_head=6 is not a multiple of 4"),
    (dict(n_head=6, n_query_groups=3), 2, "n_query_groups=3 is not a multiple of 2"),
    (dict(n_head=4, n_query_groups=2, intermediate_size=129), 2, "intermediate_size=129 is not a multiple of 2")])
def test_a_count_the_world_size_does_not_divide_is_a_typed_error(fields, size, message):
    config = Config(vocab_size=64, n_embd=48, n_layer=1, **({"intermediate_size": 128} | fields))
    with pytest.raises(ParallelError, match=message):
        check_divisible(config, size)


@pytest.mark.parametrize("change, named", [(dict(mlp="moe", n_expert=4, n_expert_per_token=2), "MoE"),
                                           (dict(qk_norm="full"), "qk_norm='full'")])
def test_unsupported_parts_are_named(change, named):
    model = GPT(dataclasses.replace(Config.from_name("tiny-llama"), **change))
    with pytest.raises(ParallelError, match=named):
        check_supported(model)


@needs_torchrun
def test_kv_groups_two_processes_do_not_divide_fail_on_every_process(tmp_path):
    directory = hf_llama(tmp_path / "ckpt", heads=6, kv_heads=3)
    done = torchrun("-m", "lucidlm", "explain", "x", "--model", str(directory), "--tensor-parallel",
                    "--target-id", "5")
    assert done.returncode != 0
    assert done.stderr.count("n_query_groups=3 is not a multiple of 2") == 2, done.stderr[-3000:]


def test_sharded_linears_compose_to_the_whole_layer():
    """Without a group: the column shards concatenate, the row shards add up, to the layer's output."""
    layer = torch.nn.Linear(6, 4)
    x = torch.randn(3, 6)
    columns = [ColumnParallelLinear.from_linear(layer, slice(r * 2, r * 2 + 2)) for r in range(2)]
    assert torch.allclose(torch.cat([c(x) for c in columns], -1), layer(x), atol=1e-6)
    rows = [RowParallelLinear.from_linear(layer, slice(r * 3, r * 3 + 3)) for r in range(2)]
    partial = sum(torch.nn.functional.linear(x[:, r * 3:r * 3 + 3], rows[r].weight) for r in range(2))
    assert torch.allclose(partial + rows[0].bias, layer(x), atol=1e-6)


def test_compiling_a_tensor_parallel_model_is_refused():
    model = GPT(Config.from_name("tiny-llama"))
    model.tensor_parallel = Shard(0, 2, model.config)  # as shard_model marks it
    with pytest.raises(ParallelError, match="a tensor-parallel model decodes eagerly"):
        LLM(model).compile()
