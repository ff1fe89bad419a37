"""AttnLRP time: lucidlm vs LXT 2.1 on the same weights, alternating processes.

LXT 2.1 patches ``transformers`` 4.5x (it does not run on transformers 5), so it runs in its own
virtual environment; this script is both the driver (run from lucidlm's venv) and the LXT child
(run by that venv's python, importing nothing of lucidlm):

    python3 -m venv /tmp/venv-lxt
    /tmp/venv-lxt/bin/pip install torch==2.13.0 "transformers>=4.50,<4.60" lxt==2.1 safetensors
    python scripts/lxt_compare.py --lxt-python /tmp/venv-lxt/bin/python [--lengths 256,1024] [--rounds 3]

Both explain the top next-token logit of the same random-token prompt with AttnLRP in float32 on
the embedded SmolLM2-135M-Instruct (its converted Hugging Face directory, which both load): one
forward and one backward each. Each cell is the median over rounds; engines alternate. The last
column compares the two relevance vectors (LXT is the reference implementation of AttnLRP).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def lxt_time(directory: str, n_tokens: int) -> float:
    import torch
    from lxt.efficient import monkey_patch
    from transformers.models.llama import modeling_llama

    monkey_patch(modeling_llama, verbose=False)
    model = modeling_llama.LlamaForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, model.config.vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(0))

    def explain():
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, use_cache=False).logits
        logits[0, -1].max().backward()
        return (embeds * embeds.grad).sum(-1)

    explain()  # warm-up
    start = time.perf_counter()
    relevance = explain()
    return time.perf_counter() - start, relevance[0].tolist()


def lucidlm_time(n_tokens: int) -> float:
    import torch

    from lucidlm import LLM

    llm = LLM.load(progress=False)
    ids = torch.randint(0, llm.config.vocab_size, (n_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    llm.explain(ids, method="attnlrp")  # warm-up
    start = time.perf_counter()
    relevance = llm.explain(ids, method="attnlrp").relevance
    return time.perf_counter() - start, relevance.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lxt-python", help="python of a venv with lxt 2.1 and transformers 4.5x")
    parser.add_argument("--lengths", default="256,1024")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=["lxt", "lucidlm"], help=argparse.SUPPRESS)
    parser.add_argument("--directory", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        seconds, relevance = lxt_time(args.directory, args.tokens) if args.child == "lxt" else lucidlm_time(args.tokens)
        print(json.dumps({"seconds": seconds, "relevance": relevance}))
        return

    from lucidlm.checkpoints.embedded import default_model_path
    from lucidlm.checkpoints.gguf import gguf_to_hf_dir

    directory = str(gguf_to_hf_dir(default_model_path(), progress=True))
    print("| tokens | LXT 2.1 s | lucidlm s | LXT / lucidlm | max abs relevance difference |\n"
          "|---:|---:|---:|---:|---:|", flush=True)
    for n in map(int, args.lengths.split(",")):
        times: dict[str, list[float]] = {"lxt": [], "lucidlm": []}
        relevances: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for engine, python in (("lxt", args.lxt_python), ("lucidlm", sys.executable)):
                out = subprocess.run([python, __file__, "--child", engine, "--directory", directory, "--tokens", str(n)],
                                     capture_output=True, text=True, check=True).stdout
                result = json.loads(out.strip().splitlines()[-1])
                times[engine].append(result["seconds"])
                relevances[engine] = result["relevance"]
        lxt, ours = statistics.median(times["lxt"]), statistics.median(times["lucidlm"])
        diff = max(abs(a - b) for a, b in zip(relevances["lxt"], relevances["lucidlm"]))
        print(f"| {n} | {lxt:.2f} | {ours:.2f} | {lxt / ours:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
