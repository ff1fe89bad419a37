"""Decode, prefill and explanation speed on a GPU: lucidlm vs transformers, same weights.

The weights are random (the GPU machine has no network and the embedded GGUF does not travel):
speed does not depend on their values. A model of the catalogue's SmolLM2-135M-Instruct config
(``--config`` for another) is built by lucidlm, saved as a Hugging Face directory, and loaded by
transformers from there, so both engines run the same tensors.

    python scripts/gpu_bench.py [--config SmolLM2-135M-Instruct] [--dtypes bfloat16,float32]

Prints one table (markdown) with the device's name; no test runs this.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def timed(fn, repeats: int = 3) -> float:
    """Median seconds of ``fn()`` after one warm-up, synchronising the GPU around each run."""
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def lucidlm_engine(model, dtype):
    from lucidlm.cache import build_cache

    state = {}

    def prefill(ids):
        state["cache"] = build_cache(model.config, 1, "dense", ids.shape[1] + 256, dtype=dtype, device="cuda")
        return model(ids, cache=state["cache"], last_only=True)[:, -1]

    def step(token):
        return model(token, cache=state["cache"], last_only=True)[:, -1]

    return prefill, step


def transformers_engine(model):
    state = {}

    def prefill(ids):
        out = model(ids, use_cache=True, logits_to_keep=1)
        state["past"] = out.past_key_values
        return out.logits[:, -1]

    def step(token):
        out = model(token, past_key_values=state["past"], use_cache=True, logits_to_keep=1)
        state["past"] = out.past_key_values
        return out.logits[:, -1]

    return prefill, step


def speeds(prefill, step, ids, new_tokens: int) -> tuple[float, float]:
    with torch.inference_mode():
        t_prefill = timed(lambda: prefill(ids))

        def decode():
            logits = prefill(ids[:, :8])
            token = logits.argmax(-1, keepdim=True)
            for _ in range(new_tokens):
                token = step(token).argmax(-1, keepdim=True)

        t_decode = timed(decode) - timed(lambda: prefill(ids[:, :8]))
    return ids.shape[1] / t_prefill, new_tokens / t_decode


def explain_times(model, n_tokens: int) -> tuple[float, float]:
    from lucidlm.explain.explainer import explain

    ids = torch.randint(0, model.config.vocab_size, (n_tokens,)).tolist()
    x = torch.tensor([ids], device="cuda")

    def forward_backward():
        logits = model(x, last_only=True)
        logits[0, -1].max().backward()
        model.zero_grad(set_to_none=True)

    return timed(forward_backward), timed(lambda: explain(model, None, ids, method="attnlrp"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="SmolLM2-135M-Instruct")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--explain-tokens", type=int, default=1024)
    args = parser.parse_args()

    import transformers

    from lucidlm.config import Config
    from lucidlm.checkpoints import save_model
    from lucidlm.model import GPT

    torch.manual_seed(0)
    config = Config.from_name(args.config)
    ours = GPT(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, args.prompt_tokens), device="cuda")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}; {args.config} (random weights), prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} greedy decode steps, explanation of {args.explain_tokens} tokens\n")
    print("| engine | dtype | prefill tok/s | decode tok/s | fwd+bwd s | AttnLRP s | AttnLRP / fwd+bwd |")
    print("|---|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as directory:
        save_model(ours, directory)
        for name in args.dtypes.split(","):
            dtype = getattr(torch, name)
            hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).cuda().eval()
            prefill_tps, decode_tps = speeds(*transformers_engine(hf), ids, args.new_tokens)
            print(f"| transformers | {name} | {prefill_tps:.0f} | {decode_tps:.1f} | | | |", flush=True)
            del hf
            model = ours.to(device="cuda", dtype=dtype)
            prefill_tps, decode_tps = speeds(*lucidlm_engine(model, dtype), ids, args.new_tokens)
            fb, lrp = explain_times(model, args.explain_tokens)
            print(f"| lucidlm | {name} | {prefill_tps:.0f} | {decode_tps:.1f} | {fb:.3f} | {lrp:.3f} | "
                  f"{lrp / fb:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
