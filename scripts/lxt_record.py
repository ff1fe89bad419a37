"""Record LXT 2.1's AttnLRP and CP-LRP relevances: the reference ``tests/test_lxt_reference.py`` checks.

LXT 2.1 patches ``transformers`` 4.5x (not 5.x), so it runs in its own virtual environment. This
script is both the driver (run from lucidlm's venv) and the LXT child (run by that venv's python,
importing nothing of lucidlm):

    python3 -m venv /tmp/venv-lxt
    /tmp/venv-lxt/bin/pip install torch==2.13.0 "transformers==4.57.6" lxt==2.1
    .venv/bin/python scripts/lxt_record.py --lxt-python /tmp/venv-lxt/bin/python [--families qwen2]

What it writes (``--out``, default ``tests/data/lxt``):

* ``<family>/`` (llama, qwen2, qwen3, gemma3, gpt2: LXT 2.1's causal-LM maps): a tiny random ``transformers`` model built and saved
  by the child (weights re-drawn from a fixed seed so that no norm is 1 and no bias 0), and
  ``<family>.json``: LXT's relevances on four fixed id sequences (4 to 60 tokens), float64;
* ``smollm2.json``: LXT's relevances on four fixed prompts (short and about 60 tokens) for the
  embedded SmolLM2-135M-Instruct (its GGUF converted to a Hugging Face directory), float32.

Each record holds the ids, the target (LXT's top next token), its logit, and per method the
relevance of every token: Σ_d h_d · ∂logit/∂h_d at the input of the first transformer block (the
embeddings for Llama; the scaled embeddings for Gemma; embeddings plus positions for GPT-2), the
convention of lucidlm and of ``lucidlm.hf``. LXT's patch maps are ``lxt.efficient.models.<family>
.attnLRP`` and ``.cp_LRP``, applied with ``lxt.efficient.monkey_patch``, one process per method
(the patches change ``transformers`` classes for good). Every file records the command, the
versions and the date.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LXT_METHODS = {"attnlrp": "attnLRP", "cp-lrp": "cp_LRP"}  # lucidlm name -> LXT patch map

#: the embedded model's prompts: two short, two of about 60 tokens
PROMPTS = [
    "The capital of France is",
    "Paris is to France as Berlin is to",
    ("The Amazon rainforest covers much of northern Brazil and parts of Peru, Colombia and "
     "Venezuela. It is home to millions of species of insects, plants, birds and other animals, "
     "and its river carries more water than any other on Earth. Scientists worry that the forest"),
    ("Alice wrote a letter to her grandmother every Sunday. She told her about school, about the "
     "garden behind their house, and about the small dog that followed her everywhere. One week "
     "the letter came back unopened, and Alice asked her mother why her grandmother had not"),
]

#: the tiny models: family -> (transformers config class, keyword arguments)
_COMMON = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
TINY = {
    "llama": ("LlamaConfig", {**_COMMON, "tie_word_embeddings": False}),
    # Qwen2: q/k/v biases (LXT's qwen2 map), tied head
    "qwen2": ("Qwen2Config", {**_COMMON, "tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {**_COMMON, "head_dim": 4, "tie_word_embeddings": False}),
    "gemma3": ("Gemma3TextConfig", {**_COMMON, "head_dim": 4, "query_pre_attn_scalar": 4, "sliding_window": 8,
                                    "layer_types": ["sliding_attention", "full_attention"]}),
    "gpt2": ("GPT2Config", {"vocab_size": 64, "n_embd": 16, "n_layer": 2, "n_head": 4, "n_positions": 128,
                            "bos_token_id": 1, "eos_token_id": 2}),
}
TINY_LENGTHS = (4, 9, 17, 60)


def tiny_ids(seed: int = 0) -> list[list[int]]:
    """The tiny models' id sequences (fixed: seeded ``random``)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, 64) for _ in range(n)] for n in TINY_LENGTHS]


# ----------------------------------------------------------------------------- LXT child
def _import_lxt_without_torchvision() -> None:
    """lxt.efficient.models imports its ViT map (torchvision) with every family. Where torchvision
    does not import (a CPU torch beside PyPI's CUDA-linked torchvision), stand in the one name that
    map reads, ``vision_transformer.nn`` (= ``torch.nn``), while lxt imports, and take it away
    again (transformers, imported first, has already decided that torchvision is absent)."""
    import sys
    import types

    try:
        import torchvision.models.vision_transformer  # noqa: F401
        return
    except Exception:  # ImportError, or torchvision's RuntimeError on its C++ ops
        pass
    import torch
    import transformers  # noqa: F401  (before the stand-in: its availability checks must not see it)

    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    vit = types.ModuleType("torchvision.models.vision_transformer")
    vit.nn = torch.nn
    models = types.ModuleType("torchvision.models")
    models.vision_transformer = vit
    root = types.ModuleType("torchvision")
    root.models = models
    stand_in = {"torchvision": root, "torchvision.models": models, "torchvision.models.vision_transformer": vit}
    sys.modules.update(stand_in)
    try:
        import lxt.efficient.models  # noqa: F401
    finally:
        for name in stand_in:
            sys.modules.pop(name, None)


def _lxt_modules(family: str):
    import importlib

    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    patches = importlib.import_module(f"lxt.efficient.models.{family}")
    return modeling, patches


def child_build(family: str, directory: str, seed: int = 0) -> None:
    """Build the tiny ``family`` model with re-drawn weights and save it to ``directory``."""
    import torch
    import transformers

    cls_name, kwargs = TINY[family]
    config = getattr(transformers, cls_name)(**kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            # matrices std 0.3 (peaked softmaxes at width 16); vectors (norms, biases) moved by 0.1
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            p.copy_(noise * 0.3 if p.dim() > 1 else p + noise * 0.1)
    model.save_pretrained(directory, safe_serialization=True)


def child_explain(family: str, directory: str, method: str, dtype: str, sequences: list[list[int]]) -> list[dict]:
    """LXT's relevances for each id sequence (its top next token), under ``method``."""
    import torch

    _import_lxt_without_torchvision()
    from lxt.efficient import monkey_patch
    from transformers import AutoModelForCausalLM

    modeling, patches = _lxt_modules(family)
    monkey_patch(modeling, getattr(patches, LXT_METHODS[method]), verbose=False)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype),
                                                 attn_implementation="eager").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    block = _blocks(model)[0]
    records = []
    for ids in sequences:
        captured = {}

        def hook(module, args, kwargs, captured=captured):
            hidden = args[0] if args else kwargs["hidden_states"]
            hidden.retain_grad()
            captured["h"] = hidden

        handle = block.register_forward_pre_hook(hook, with_kwargs=True)
        embeds = model.get_input_embeddings()(torch.tensor([ids])).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, use_cache=False).logits[0, -1]
        handle.remove()
        target = int(logits.argmax())
        logits[target].backward()
        h = captured["h"]
        relevance = (h * h.grad).sum(-1)[0]
        records.append({"ids": ids, "target": target, "logit": float(logits[target]),
                        "relevance": relevance.double().tolist()})
    return records


def _blocks(model):
    from torch import nn

    return next(m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m))


def child_versions() -> dict:
    import importlib.metadata as md
    import platform

    return {name: md.version(name) for name in ("lxt", "transformers", "torch")} | {"python": platform.python_version()}


# ----------------------------------------------------------------------------- driver
def _run_child(python: str, *args: str) -> object:
    out = subprocess.run([python, __file__, "--child", *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def record(python: str, family: str, directory: Path, dtype: str, sequences: list[list[int]],
           prompts: list[str] | None, meta: dict) -> dict:
    """LXT's records for both methods, merged: one entry per sequence with a relevance per method."""
    runs = {m: _run_child(python, "explain", family, str(directory), m, dtype, json.dumps(sequences))
            for m in LXT_METHODS}
    records = []
    for i, ids in enumerate(sequences):
        first = runs["attnlrp"][i]
        assert all(runs[m][i]["target"] == first["target"] for m in runs), "the forward must not depend on the method"
        entry = {"ids": ids, "target": first["target"], "logit": first["logit"],
                 "relevance": {m: runs[m][i]["relevance"] for m in runs}}
        if prompts is not None:
            entry = {"prompt": prompts[i], **entry}
        records.append(entry)
    return {"meta": {**meta, "family": family, "dtype": dtype}, "records": records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lxt-python", default="/tmp/venv-lxt/bin/python",
                        help="python of a venv with lxt 2.1 and transformers 4.5x")
    parser.add_argument("--out", default=str(ROOT / "tests" / "data" / "lxt"))
    parser.add_argument("--families", nargs="+", choices=[*TINY, "smollm2"], default=[*TINY, "smollm2"],
                        help="record only these (default: every tiny family and the embedded SmolLM2)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "build":
            child_build(rest[0], rest[1])
            result: object = "ok"
        elif kind == "versions":
            result = child_versions()
        else:
            family, directory, method, dtype, sequences = rest
            result = child_explain(family, directory, method, dtype, json.loads(sequences))
        print(json.dumps(result))
        return
    drive(args.lxt_python, Path(args.out), args.families)


def drive(python: str, out: Path, families: list[str]) -> None:
    import datetime
    import shutil

    from lucidlm.checkpoints.embedded import default_model_path
    from lucidlm.checkpoints.gguf import gguf_to_hf_dir
    from lucidlm.fileio import atomic_dir, atomic_write
    from lucidlm.tokenizer import Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    meta = {"versions": _run_child(python, "versions"), "date": datetime.date.today().isoformat(),
            "command": f"{Path(sys.executable).name} scripts/lxt_record.py --lxt-python {python} --families {' '.join(families)}",
            "relevance": "sum over the hidden dimension of h * dlogit/dh at the first block's input",
            "lxt": "lxt.efficient.monkey_patch(modeling_<family>, lxt.efficient.models.<family>.attnLRP "
                   "| .cp_LRP); eager attention"}
    for family in [f for f in TINY if f in families]:
        target = out / family
        if target.exists():
            shutil.rmtree(target)
        with atomic_dir(target) as tmp:
            _run_child(python, "build", family, str(tmp))
            for file in tmp.iterdir():  # safetensors writes 0600: the test data is for everyone to read
                file.chmod(0o644)
        data = record(python, family, target, "float64", tiny_ids(), None, meta)
        atomic_write(out / f"{family}.json", json.dumps(data, indent=1) + "\n")
        print(f"wrote {out / family} and {out / family}.json", flush=True)
    if "smollm2" not in families:
        return
    directory = gguf_to_hf_dir(default_model_path(), progress=True)
    tokenizer = Tokenizer.from_dir(directory)
    sequences = [list(tokenizer.encode(p)) for p in PROMPTS]
    data = record(python, "llama", directory, "float32", sequences, PROMPTS,
                  {**meta, "model": "embedded SmolLM2-135M-Instruct (GGUF converted by lucidlm)"})
    atomic_write(out / "smollm2.json", json.dumps(data, indent=1) + "\n")
    print(f"wrote {out / 'smollm2.json'}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # the driver imports lucidlm from this checkout
    main()
