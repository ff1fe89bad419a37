"""Models from the Hugging Face Hub: ``lucidlm download org/name`` and ``LLM.load("org/name")``,
or a catalogue name for one (``lucidlm models``: ``LLM.load("Llama-3.2-1B")``, any case; a local
path of that name wins).

Only configs, tokenizer files and safetensors weights are fetched (:data:`ALLOW_PATTERNS`): never
pickles, never code. :func:`huggingface_hub.snapshot_download` does the transfer, so a download shows
a progress bar, resumes where an interrupted one stopped, lands in the standard cache under
``HF_HOME`` (or in ``directory``) and, with ``HF_HUB_OFFLINE=1``, is served from that cache alone.
A snapshot is checked (config parses, every shard present and complete) before it is returned.

>>> from lucidlm.checkpoints.hub import download
>>> download("HuggingFaceTB/SmolLM2-135M-Instruct")  # doctest: +SKIP
PosixPath('/home/me/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/...')
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import struct
from fnmatch import fnmatchcase
from pathlib import Path

from ..catalogue import repo_for
from ..errors import CheckpointError

_META_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "model.safetensors.index.json"]
#: the files we fetch (``fnmatch`` patterns, as ``snapshot_download`` takes them)
ALLOW_PATTERNS = [*_META_FILES, "*.safetensors"]
#: weights we refuse: unpickling runs arbitrary code
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt"]
_HF_WEIGHTS = re.compile(r"model(-\d+-of-\d+)?\.safetensors")  # what transformers itself loads
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def is_repo_id(text: str) -> bool:
    """Whether ``text`` names a Hub repository (``org/name``) rather than a local file or directory."""
    return (bool(_REPO_ID.fullmatch(text)) and ".." not in text and not text.endswith(".gguf")
            and not Path(text).exists())


def hub_repo(text: str) -> str | None:
    """The hub repo id ``text`` names, or None for a local path: ``org/name`` itself, or the repo of
    a catalogue name (:func:`lucidlm.catalogue.repo_for`, any case). Nothing is fetched or opened:
    an existing path of that name wins.

    >>> hub_repo("Qwen/Qwen3-0.6B"), hub_repo("qwen3-0.6b"), hub_repo("runs/model.gguf")
    ('Qwen/Qwen3-0.6B', 'Qwen/Qwen3-0.6B', None)
    """
    if is_repo_id(text):
        return text
    return None if Path(text).exists() else repo_for(text)


def resolve(path_or_repo: str | Path, revision: str | None = None, progress: bool = True) -> Path:
    """A local checkpoint directory for a repo id or catalogue name (downloaded or from the cache,
    see :func:`hub_repo`); a path as it is."""
    repo = hub_repo(str(path_or_repo))
    if repo is not None:
        return download(repo, revision=revision, progress=progress)
    return Path(path_or_repo)


def download(repo_id: str, directory: str | Path | None = None, revision: str | None = None,
             progress: bool = True, token: str | bool | None = None, force: bool = False) -> Path:
    """Fetch ``repo_id``'s config, tokenizer and safetensors weights; return the local directory.

    ``directory``: download there instead of the Hugging Face cache (offline, a model found in the
    cache is copied there). ``force``: fetch every file again (a corrupt, not a partial, file).
    Every failure is a :class:`CheckpointError` naming the repository or the file at fault.
    """
    import huggingface_hub as hub
    from huggingface_hub import constants

    offline = constants.is_offline_mode()
    where = constants.HF_HUB_CACHE + (f" or {directory}" if directory is not None else "")
    fetch = {"revision": revision, "token": token, "force_download": force,
             "tqdm_class": None if progress else _quiet_tqdm()}
    try:
        patterns = ALLOW_PATTERNS
        if not offline:
            try:
                patterns = _files_to_fetch(repo_id, hub.HfApi(token=token).list_repo_files(repo_id, revision=revision))
            except _network_errors():
                pass  # snapshot_download falls back to the cache, or says the hub cannot be reached
        if offline and directory is not None and not (Path(directory).is_dir() and any(Path(directory).iterdir())):
            # offline, snapshot_download(local_dir=...) only returns a directory already filled: copy from the cache
            cached = Path(hub.snapshot_download(repo_id, allow_patterns=patterns, **fetch))
            Path(directory).mkdir(parents=True, exist_ok=True)
            for f in cached.iterdir():
                if f.is_file() and _matches(f.name, ALLOW_PATTERNS):
                    shutil.copy2(f, Path(directory) / f.name)  # follows the cache's symlinks to blobs
            path = Path(directory)
        else:
            path = Path(hub.snapshot_download(repo_id, allow_patterns=patterns, local_dir=directory, **fetch))
    except Exception as exc:  # huggingface_hub's errors are translated, others re-raised as they are
        error = _translate(exc, repo_id, revision, offline, where)
        if error is exc:
            raise
        raise error from exc
    return check_snapshot(path, repo_id)


def check_snapshot(directory: Path, repo_id: str) -> Path:
    """``directory``, after checking it is a complete safetensors checkpoint (else CheckpointError)."""
    again = f"download it again with `lucidlm download {repo_id} --force` (download(..., force=True))"
    config = _json(directory / "config.json", "the model's config.json", again)
    if not isinstance(config, dict):
        raise CheckpointError(f"{directory / 'config.json'}: expected a JSON object; {again}")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _json(index, "a safetensors index", again).get("weight_map") or {}
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).is_file():
                raise CheckpointError(f"{index}: lists shard {shard}, which is missing from {directory}; re-run "
                                      f"`lucidlm download {repo_id}` (it resumes where it stopped)")
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        pickles = [f.name for f in directory.iterdir() if _matches(f.name, PICKLE_PATTERNS)]
        raise CheckpointError(_pickle_message(repo_id, pickles) if pickles
                              else f"{directory}: no *.safetensors weight files ({repo_id})")
    for shard in shards:
        _check_safetensors(shard, again)
    return directory


def cached_snapshot(repo_id: str) -> Path | None:
    """The newest snapshot of ``repo_id`` in the local Hugging Face cache with a config.json and
    safetensors weights, or None. Reads the cache's documented layout
    (``models--ORG--NAME/snapshots/REVISION/``): no network, no download machinery, nothing checked
    inside the files (``lucidlm models`` calls it once per catalogue entry).

    >>> cached_snapshot("no-such-org/no-such-model") is None
    True
    """
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    try:
        candidates = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return None
    for snapshot in candidates:
        if (snapshot / "config.json").is_file() and any(snapshot.glob("*.safetensors")):
            return snapshot
    return None


def _files_to_fetch(repo_id: str, files: list[str]) -> list[str]:
    """The repository's files we want: top-level configs and safetensors (only ``model.safetensors``
    or its shards when there are: not duplicates such as Mistral's ``consolidated.safetensors``)."""
    top = [f for f in files if "/" not in f]
    weights = [f for f in top if f.endswith(".safetensors")]
    weights = [f for f in weights if _HF_WEIGHTS.fullmatch(f)] or weights
    if not weights:
        pickles = [f for f in files if _matches(f, PICKLE_PATTERNS)]
        raise CheckpointError(_pickle_message(repo_id, pickles) if pickles
                              else f"{repo_id}: the repository has no *.safetensors weight files")
    return [f for f in top if f in _META_FILES] + weights


def _pickle_message(repo_id: str, pickles: list[str]) -> str:
    return (f"{repo_id}: ships only pickled weights ({', '.join(sorted(pickles)[:3])}), no *.safetensors; "
            "lucidlm refuses to load pickles (unpickling can run arbitrary code): look for a safetensors "
            "version of this model, or convert it yourself from a source you trust")


def _check_safetensors(path: Path, again: str) -> None:
    """A readable header and exactly the bytes it declares: 8-byte little-endian length N, N bytes of
    JSON, then the tensor data, whose end is the largest ``data_offsets[1]``."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise ValueError(f"header of {n} bytes declared, file has {size}")
            header = json.loads(f.read(n))
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt, no readable safetensors header ({exc}); "
                              f"{again}") from None
    end = 8 + n + max(ends, default=0)
    if size != end:
        what = "truncated (incomplete download)" if size < end else "corrupt (trailing bytes)"
        raise CheckpointError(f"{path}: {what}: its header declares {end} bytes, the file has {size}; {again}")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):
            pass
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors file ({exc}); {again}") from None


def _json(path: Path, expected: str, again: str):
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (expected {expected})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not valid JSON, expected {expected} ({exc}); {again}") from None


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def _quiet_tqdm():
    from huggingface_hub.utils import tqdm

    class QuietTqdm(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})

    return QuietTqdm


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection failures, from whichever HTTP client this huggingface_hub uses (httpx2 in 2.x,
    httpx in 1.x, requests before); ``OfflineModeIsEnabled`` is a ``ConnectionError``."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _translate(exc: Exception, repo_id: str, revision: str | None, offline: bool, where: str) -> Exception:
    """huggingface_hub's exception as a CheckpointError that says what to do (others unchanged)."""
    from huggingface_hub import errors as e

    rerun = f"re-run `lucidlm download {repo_id}` with network access (it resumes where it stopped)"
    if isinstance(exc, CheckpointError):
        return exc
    if isinstance(exc, getattr(e, "IncompleteSnapshotError", ())):
        return CheckpointError(f"{repo_id}: the cached snapshot {exc.snapshot_path} is incomplete and the "
                               f"Hugging Face Hub cannot be reached; {rerun}")
    if isinstance(exc, e.LocalEntryNotFoundError) and offline:
        return CheckpointError(f"{repo_id}: not in the local Hugging Face cache ({where}) and offline mode is on "
                               f"(HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE and run `lucidlm download {repo_id}`, "
                               "or point HF_HOME at the cache that holds it")
    if isinstance(exc, (e.LocalEntryNotFoundError, *_network_errors())):
        return CheckpointError(f"{repo_id}: the Hugging Face Hub could not be reached and the model is not in "
                               f"the local cache ({where}); check the connection (or HF_ENDPOINT, proxies), or "
                               "set HF_HUB_OFFLINE=1 to use only models already downloaded")
    if isinstance(exc, e.GatedRepoError):
        return CheckpointError(f"{repo_id}: a gated repository: accept its conditions on huggingface.co, then "
                               "log in (`hf auth login`) or set HF_TOKEN")
    if isinstance(exc, e.RevisionNotFoundError):
        return CheckpointError(f"{repo_id}: no revision {revision!r} on the Hugging Face Hub")
    if isinstance(exc, e.RepositoryNotFoundError):
        return CheckpointError(f"{repo_id}: no such model repository on the Hugging Face Hub (if it is private, "
                               "log in with `hf auth login` or set HF_TOKEN)")
    if isinstance(exc, e.HfHubHTTPError):
        return CheckpointError(f"{repo_id}: the Hugging Face Hub answered with an error ({exc})")
    if isinstance(exc, e.HFValidationError):
        return CheckpointError(f"{repo_id}: not a valid Hugging Face repository id ({exc})")
    return exc
