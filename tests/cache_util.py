"""Helpers for tests that drive one layer cache by hand."""

import torch


def feed(layer, positions, scores=None, k=None, v=None):
    """One step straight into a layer cache: new tokens at ``positions`` (batch, tokens), keys and
    values of head size 4 (random unless given), then ``settle(scores)``."""
    pos = torch.tensor(positions)
    shape = (pos.shape[0], layer.k[0].shape[1], pos.shape[1], 4)
    k = torch.randn(shape) if k is None else k
    layer.extend(k, torch.randn(shape) if v is None else v, pos)
    layer.settle(scores)


def keys_with_norms(norms):
    """Keys (batch, groups, tokens, 4) whose vectors have the given L2 norms."""
    k = torch.zeros(*torch.tensor(norms).shape, 4)
    k[..., 0] = torch.tensor(norms, dtype=torch.float)
    return k


def padded_and_alone(model, policy, budget):
    """Prompts of 20 and 13 tokens prefilled together (left-padded, one chunk), then 5 decode steps,
    through ``policy`` with ``budget`` slots; and each prompt run alone the same way. Returns
    (logits together (2, 6, vocab), cache together, [(logits alone (1, 6, vocab), cache alone)] per row)."""
    from lucidlm.cache import build_cache, prefill
    from lucidlm.generate import left_pad

    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (20, 13)]
    steps = torch.randint(3, 256, (2, 5), generator=gen)

    def run(rows):
        ids, pos = left_pad([prompts[r] for r in rows])
        cache = build_cache(model.config, len(rows), policy, budget)
        out = [prefill(model, ids, cache, chunk_size=32, positions=pos)]
        nxt = pos.max(1).values + 1
        with torch.no_grad():
            for t in range(steps.shape[1]):
                out.append(model(steps[rows, t:t + 1], positions=(nxt + t)[:, None], cache=cache)[:, -1])
        return torch.stack(out, 1), cache

    together, cache = run([0, 1])
    return together, cache, [run([r]) for r in (0, 1)]
