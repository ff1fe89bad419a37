"""``LLM.load(x.gguf, keep_quantized=True)``: Q8_0/Q4_0/Q4_1 weights kept as blocks.

The oracle is the float model ``LLM.load(x.gguf)`` loads from the same file: its weights come from
``gguf.quants.dequantize`` (llama.cpp's own Python dequantiser), independent of how the blocks are split
into ``qs``/``scales``/``mins`` and of lucidlm's dequantisers and kernels.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

import lucidlm
from lucidlm.checkpoints.gguf.quantized import KeptFloatWarning
from lucidlm.cli import main
from lucidlm.errors import CheckpointError, TrainError
from lucidlm.model.qmodules import QuantEmbedding, QuantLinear
from test_gguf import _write_tiny

PROMPTS = ["the", "he th", "t"]


def requantized(source: pathlib.Path, target: pathlib.Path, kind: str, keep_float: tuple[str, ...] = ()) -> pathlib.Path:
    """``source`` (an F32 GGUF) with every matrix (but those in ``keep_float``) quantised to ``kind`` by
    ``gguf.quants.quantize``; the metadata copied as it is."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = reader.get_field("general.architecture").contents()
    writer = gguf.GGUFWriter(str(target), arch=arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    qtype = gguf.GGMLQuantizationType[kind]
    for tensor in reader.tensors:
        value = np.array(tensor.data, dtype=np.float32).reshape([int(d) for d in reversed(tensor.shape)])
        if value.ndim == 2 and tensor.name not in keep_float:
            writer.add_tensor(tensor.name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(tensor.name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """kind -> (a tiny Llama GGUF of that block type, its cache dir); tied and untied variants."""
    root = tmp_path_factory.mktemp("keep-quantized")
    untied = _write_tiny(root / "untied-f32.gguf")
    tied_file = _write_tiny(root / "tied-f32.gguf", untied=False)

    def make(kind: str, tied: bool = False) -> pathlib.Path:
        source = tied_file if tied else untied
        target = root / f"{'tied' if tied else 'untied'}-{kind}.gguf"
        return target if target.is_file() else requantized(source, target, kind)

    make.source = untied  # the F32 file itself
    return make, root / "cache"


def _pair(path, cache, **kwargs):
    return (lucidlm.LLM.load(path, keep_quantized=True, cache_dir=cache, **kwargs),
            lucidlm.LLM.load(path, cache_dir=cache, **kwargs))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_kept_blocks_generate_and_explain_as_the_dequantised_model(tiny_gguf, kind, tied):
    make, cache = tiny_gguf
    kept, dense = _pair(make(kind, tied), cache)
    ids = torch.tensor([[5, 9, 2, 7, 100, 3]])
    with torch.no_grad():
        # the same weights; products summed in another order (the kept model's GEMMs run on slices)
        torch.testing.assert_close(kept.model(ids), dense.model(ids), rtol=1e-4, atol=1e-4)
    for prompt in PROMPTS:
        assert kept.generate(prompt, max_new_tokens=8) == dense.generate(prompt, max_new_tokens=8)
        ours, theirs = kept.explain(prompt), dense.explain(prompt)
        assert ours.target_ids == theirs.target_ids
        torch.testing.assert_close(ours.relevance, theirs.relevance, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_1"])
def test_buffers_are_the_blocks_and_no_float_weight_is_kept(tiny_gguf, kind):
    make, cache = tiny_gguf
    llm = lucidlm.LLM.load(make(kind, tied=True), keep_quantized=True, cache_dir=cache)
    model = llm.model
    assert isinstance(model.embed, QuantEmbedding) and isinstance(model.lm_head, QuantLinear)
    assert model.lm_head.qs is model.embed.qs  # tied: one copy of the blocks
    quantised = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    assert len(quantised) == 2 * 7 + 2  # 7 matrices per layer, the embedding and the tied head
    expected = torch.int8 if kind == "Q8_0" else torch.uint8
    assert {m.qs.dtype for m in quantised} == {expected}
    assert {m.scales.dtype for m in quantised} == {torch.float16}
    assert all((m.mins is not None) == (kind == "Q4_1") for m in quantised)
    # the only float tensors left are the norms (1-D): no matrix is held in float
    floats = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point()]
    assert all(t.dim() == 1 for n, t in floats if not n.endswith(("scales", "mins"))), \
        [n for n, t in floats if t.dim() > 1 and not n.endswith(("scales", "mins"))]


def test_bfloat16_keeps_the_scales_and_computes_in_bfloat16(tiny_gguf):
    make, cache = tiny_gguf
    kept = lucidlm.LLM.load(make("Q8_0"), keep_quantized=True, cache_dir=cache, dtype=torch.bfloat16)
    exact = lucidlm.LLM.load(make("Q8_0"), cache_dir=cache)  # float32
    layer = kept.model.layers[0].attn.q_proj
    assert layer.scales.dtype == torch.float16  # not rounded to bfloat16
    x = torch.randn(1, layer.in_features).bfloat16()
    with torch.no_grad():
        assert kept.model(torch.tensor([[5, 9, 2, 7]])).dtype == torch.bfloat16
        out, reference = layer(x), exact.model.layers[0].attn.q_proj(x.float())
    assert out.dtype == torch.bfloat16
    assert (out.float() - reference).abs().max() <= 2**-7 * reference.abs().max()  # bfloat16's rounding only


def test_another_block_type_is_dequantised_with_a_note_naming_it(tiny_gguf, tmp_path):
    make, cache = tiny_gguf
    path = requantized(make.source, tmp_path / "q5.gguf", "Q5_0")
    with pytest.warns(KeptFloatWarning, match=r"16 Q5_0 tensor\(s\) dequantised to float"):
        kept = lucidlm.LLM.load(path, keep_quantized=True, cache_dir=cache)
    dense = lucidlm.LLM.load(path, cache_dir=cache)
    assert not any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in kept.model.modules())
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(kept.model(ids), dense.model(ids))


def test_a_hugging_face_directory_is_refused_naming_the_argument(hf_checkpoint):
    _, directory = hf_checkpoint("smollm2")
    with pytest.raises(CheckpointError, match="keep_quantized=True: .* is not a .gguf file"):
        lucidlm.LLM.load(directory, keep_quantized=True)


def test_training_and_adapters_are_refused_with_a_typed_error(tiny_gguf, tmp_path):
    make, cache = tiny_gguf
    llm = lucidlm.LLM.load(make("Q8_0"), keep_quantized=True, cache_dir=cache)
    with pytest.raises(TrainError, match="load it without keep_quantized"):
        llm.finetune([{"text": "the"}], steps=1)
    with pytest.raises(TrainError, match="keep_quantized=True"):
        llm.load_adapter(tmp_path)


def test_the_command_line_option(tiny_gguf, capsys, monkeypatch):
    make, cache = tiny_gguf
    monkeypatch.setenv("LUCIDLM_CACHE", str(cache))
    path = make("Q4_0")
    assert main(["generate", "the", "--model", str(path), "--keep-quantized", "--max-new-tokens", "4"]) == 0
    kept = capsys.readouterr().out
    assert main(["generate", "the", "--model", str(path), "--max-new-tokens", "4"]) == 0
    assert kept == capsys.readouterr().out


# ----------------------------------------------------------------------------- the embedded model (slow)


@pytest.mark.slow
def test_embedded_q4_1_keeps_its_blocks_and_matches_the_dequantised_model(smollm2, temp_conversion_cache):
    kept = lucidlm.LLM.load(keep_quantized=True, cache_dir=temp_conversion_cache)
    assert sum(isinstance(m, QuantLinear) for m in kept.model.modules()) == 30 * 7 + 1
    for prompt in ("The capital of France is", "def fibonacci(n):"):
        assert kept.generate(prompt, max_new_tokens=16) == smollm2.generate(prompt, max_new_tokens=16)
    ours, theirs = kept.explain("The capital of France is"), smollm2.explain("The capital of France is")
    torch.testing.assert_close(ours.relevance, theirs.relevance, rtol=1e-4, atol=1e-5)


_RSS_SCRIPT = """
import json, os, resource, sys
import torch, lucidlm
from lucidlm.api import _tokenizer_for
from lucidlm.checkpoints import checkpoint_dir
from lucidlm.config import Config
from lucidlm.model import GPT

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

path, directory = checkpoint_dir(sys.argv[1], cache_dir=sys.argv[2])
with torch.device("meta"):
    GPT(Config.from_name("tiny-llama"))  # the modules the model code imports on first use (torch._dynamo)
tokenizer = _tokenizer_for(directory)
runtime = peak()
llm = lucidlm.LLM.load(path, keep_quantized=True, cache_dir=sys.argv[2])
loaded = peak()
llm.generate("The capital of France is", max_new_tokens=4)
print(json.dumps({"runtime": runtime, "loaded": loaded, "generated": peak()}))
"""


@pytest.mark.slow
def test_peak_memory_is_about_the_file(converted, temp_conversion_cache):
    """A fresh process: peak RSS of loading <= 1.2 x the file + the runtime (the RSS of torch, lucidlm,
    the modules its model code imports and the tokenizer, before any weight is read); generating a few
    tokens adds its own working memory (measured 1.4 x the file in all). ``converted``: the file's
    conversion (config, tokenizer) is cached beforehand."""
    from lucidlm.checkpoints.embedded import default_model_path

    path = default_model_path()
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(lucidlm.__file__).parent.parent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path), str(temp_conversion_cache)], env=env,
                          capture_output=True, text=True, timeout=600, check=True)
    rss = json.loads(done.stdout.strip().splitlines()[-1])
    size = path.stat().st_size
    assert rss["loaded"] <= 1.2 * size + rss["runtime"], rss
    assert rss["generated"] <= 1.5 * size + rss["runtime"], rss
