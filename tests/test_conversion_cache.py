"""The GGUF conversion cache: one entry per file *content* (not per path), atomic under
concurrency, listable and clearable (``lucidlm cache list|clear``), written with the umask's modes."""

from __future__ import annotations

import argparse
import doctest
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lucidlm import fileio
from lucidlm.checkpoints import conversion_cache as cc
from lucidlm.checkpoints import gguf as lgguf
from lucidlm.checkpoints.embedded import default_model_path
from lucidlm.checkpoints.gguf import gguf_to_hf_dir
from lucidlm.commands.cache import CACHE
from test_gguf import _write_tiny


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _scale_tensor(path: Path, name: str, factor: float = 1.01) -> None:
    """Rewrite one float32 tensor of ``path`` in place, as a fine-tune of that tensor would."""
    from gguf import GGUFReader

    tensor = next(t for t in GGUFReader(path).tensors if t.name == name)
    offset, values = int(tensor.data_offset), np.array(tensor.data, dtype=np.float32)
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write((values * factor).astype(np.float32).tobytes())


@pytest.fixture
def tiny(tmp_path) -> Path:
    return _write_tiny(tmp_path / "tiny.gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fake cache root, through the environment variable users set."""
    root = tmp_path / "cache"
    monkeypatch.setenv("LUCIDLM_CACHE", str(root))
    return root


# ----------------------------------------------------------------------------- the fingerprint


def test_header_walk_agrees_with_gguf_reader(tiny):
    import mmap

    from gguf import GGUFReader

    for path in (tiny, default_model_path()):
        reader = GGUFReader(path)
        with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            start, offsets = cc._data_layout(mm)
        assert start == reader.data_offset
        assert sorted(offsets) == sorted(int(t.data_offset) - reader.data_offset for t in reader.tensors)


def test_fingerprint_follows_content_not_path_or_mtime(tiny, tmp_path):
    first = cc.fingerprint(tiny)
    assert first is not None and len(first) == 64
    copy = tmp_path / "elsewhere" / "renamed.gguf"
    copy.parent.mkdir()
    shutil.copyfile(tiny, copy)
    os.utime(copy, ns=(time.time_ns(), tiny.stat().st_mtime_ns + 10**9))
    assert cc.fingerprint(copy) == first
    _scale_tensor(copy, "blk.1.attn_q.weight")  # one tensor "fine-tuned"
    assert cc.fingerprint(copy) not in (None, first)


def test_fingerprint_of_a_damaged_header_is_none(tmp_path, tiny):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny.read_bytes()[:200])  # inside the metadata
    assert cc.fingerprint(cut) is None
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (2**62).to_bytes(8, "little") * 2)
    assert cc.fingerprint(junk) is None  # an absurd count fails at once, it does not loop


# ----------------------------------------------------------------------------- gguf_to_hf_dir


def test_one_entry_per_content_wherever_the_file_lies(tiny, tmp_path, cache):
    first = gguf_to_hf_dir(tiny, progress=False)
    assert first.parent == cache
    # another virtual environment / clone holds a copy under another name: no second conversion
    other = tmp_path / "venv2" / "site-packages" / "model.gguf"
    other.parent.mkdir(parents=True)
    shutil.copy2(tiny, other)
    os.utime(other)
    assert gguf_to_hf_dir(other, progress=False) == first
    assert [p.name for p in cache.iterdir()] == [first.name]
    source = json.loads((first / cc.SOURCE_FILE).read_text())
    assert source["source"] == "tiny.gguf" and source["format_version"] == cc.FORMAT_VERSION
    assert source["dtype"] == "float32" and source["size"] == tiny.stat().st_size


def test_touched_file_is_a_hit_changed_file_converts_again(tiny, cache):
    first = gguf_to_hf_dir(tiny, progress=False)
    weights = (first / "model.safetensors").stat().st_mtime_ns
    os.utime(tiny, ns=(time.time_ns(), tiny.stat().st_mtime_ns + 10**9))
    assert gguf_to_hf_dir(tiny, progress=False) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == weights
    _scale_tensor(tiny, "blk.0.ffn_down.weight")
    second = gguf_to_hf_dir(tiny, progress=False)
    assert second != first and second.is_dir() and first.is_dir()


def test_format_version_is_part_of_the_key(tiny, cache, monkeypatch):
    old = gguf_to_hf_dir(tiny, progress=False)
    monkeypatch.setattr(cc, "FORMAT_VERSION", cc.FORMAT_VERSION + 1)
    new = gguf_to_hf_dir(tiny, progress=False)
    assert new != old
    by_name = {e.name: e for e in cc.list_entries()}
    assert by_name[new.name].current and not by_name[old.name].current
    assert "old format" in cc.format_entries(cc.list_entries())


def test_entries_get_the_umasks_modes(tiny, cache):
    entry = gguf_to_hf_dir(tiny, progress=False)
    assert _mode(entry) == 0o777 & ~_umask()
    assert {_mode(f) for f in entry.iterdir()} == {0o666 & ~_umask()}


def test_a_conversion_that_loses_the_race_uses_the_winners_entry(tiny, cache, monkeypatch):
    """Process B finishes the same conversion while A is still writing: A drops its copy."""
    real = lgguf._write_hf_dir
    seen = []

    def write_then_lose(reader, path, out, dtype, progress):
        real(reader, path, out, dtype, progress)
        if not seen:  # the competitor, as a nested call: it renames its entry into place first
            seen.append(out)
            seen.append(gguf_to_hf_dir(path, progress=False))

    monkeypatch.setattr(lgguf, "_write_hf_dir", write_then_lose)
    assert gguf_to_hf_dir(tiny, progress=False) == seen[1]
    assert not seen[0].exists()
    assert [p.name for p in cache.iterdir()] == [seen[1].name]  # no second copy, no temp dir


def test_concurrent_processes_share_one_entry(tiny, cache):
    code = ("import sys; from lucidlm.checkpoints.gguf import gguf_to_hf_dir; "
            "print(gguf_to_hf_dir(sys.argv[1], progress=False))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tiny)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    assert len({out.strip() for out, _ in results}) == 1
    assert [p.name for p in cache.iterdir()] == [Path(results[0][0].strip()).name]
    assert cc.is_complete(cache / Path(results[0][0].strip()).name)


# ----------------------------------------------------------------------------- list and clear


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lucidlm")
    CACHE.add_to(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def _cache_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = CACHE.run(_parse(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def two_entries(tmp_path, cache) -> list[Path]:
    a = _write_tiny(tmp_path / "alpha.gguf")
    b = tmp_path / "beta.gguf"
    shutil.copyfile(a, b)
    _scale_tensor(b, "output.weight")
    entries = [gguf_to_hf_dir(a, progress=False), gguf_to_hf_dir(b, progress=False)]
    past = time.time() - 3600
    os.utime(entries[0], (past, past))  # alpha last used an hour ago
    return entries


def test_list_shows_source_size_and_last_use(two_entries, cache, capsys):
    entries = cc.list_entries()
    assert [e.source for e in entries] == ["beta.gguf", "alpha.gguf"]  # most recently used first
    for e in entries:
        assert e.size_bytes == sum(f.stat().st_size for f in e.path.iterdir()) and e.current
    rc, out, _ = _cache_cli(["cache", "list"], capsys)
    assert rc == 0
    assert f"conversion cache {cache} ($LUCIDLM_CACHE): 2 entries" in out
    for e in entries:
        line = next(line for line in out.splitlines() if line.startswith(e.source))
        assert cc.format_bytes(e.size_bytes) in line and e.name in line and "float32" in line
        assert time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)) in line


def test_a_hit_records_the_use(two_entries, tmp_path):
    before = two_entries[0].stat().st_mtime
    gguf_to_hf_dir(tmp_path / "alpha.gguf", progress=False)
    assert two_entries[0].stat().st_mtime > before + 1000


def test_list_of_an_empty_or_missing_cache(cache, capsys):
    assert cc.list_entries() == []
    rc, out, _ = _cache_cli(["cache", "list"], capsys)
    assert rc == 0 and out.strip() == f"conversion cache {cache} ($LUCIDLM_CACHE): empty"


def test_clear_by_name_removes_only_that_entry(two_entries, capsys):
    alpha, beta = two_entries
    size = cc.list_entries()[1].size_bytes
    rc, out, _ = _cache_cli(["cache", "clear", "alpha.gguf"], capsys)
    assert rc == 0 and out.strip() == f"removed 1 entry, freed {cc.format_bytes(size)}"
    assert not alpha.exists() and beta.exists()
    for name in (beta.name, "beta"):  # the entry's own name, the GGUF's stem
        assert cc.select(cc.list_entries(), [name])[0][0].path == beta


def test_clear_of_an_unknown_name_removes_nothing(two_entries, capsys):
    rc, _, err = _cache_cli(["cache", "clear", "alpha.gguf", "gamma.gguf"], capsys)
    assert rc == 1 and "'gamma.gguf'" in err
    assert all(p.exists() for p in two_entries)
    rc, _, err = _cache_cli(["cache", "clear"], capsys)
    assert rc == 2 and "--all" in err
    rc, _, _ = _cache_cli(["cache", "clear", "--all", "alpha.gguf"], capsys)
    assert rc == 2 and all(p.exists() for p in two_entries)


def test_clear_all_frees_every_entry_and_leaves_other_files(two_entries, cache, capsys):
    (cache / "notes").mkdir()  # not a conversion: never listed or removed
    (cache / "notes" / "config.json").write_text("{}")
    (cache / "readme.txt").write_text("mine")
    stale, fresh = cache / ".tmp-dead", cache / ".tmp-running"  # a conversion that died, one running
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
    os.utime(stale, (time.time() - 2 * 86400,) * 2)
    total = sum(e.size_bytes for e in cc.list_entries()) + 1000
    rc, out, _ = _cache_cli(["cache", "clear", "--all"], capsys)
    assert rc == 0 and out.strip() == f"removed 2 entries, freed {cc.format_bytes(total)}"
    assert sorted(p.name for p in cache.iterdir()) == [".tmp-running", "notes", "readme.txt"]


def test_clear_goes_through_a_trash_name(two_entries, monkeypatch):
    renamed = []
    real_rename = os.rename
    monkeypatch.setattr(cc.os, "rename", lambda a, b: (renamed.append(Path(b).name), real_rename(a, b))[1])
    assert cc.clear(cc.list_entries()[:1]) > 0
    assert renamed and renamed[0].startswith(".trash-")
    assert not any(p.name.startswith(".trash-") for p in two_entries[0].parent.iterdir())


def test_a_cleared_entry_is_converted_again(two_entries, tmp_path):
    cc.clear()
    assert cc.list_entries() == []
    assert gguf_to_hf_dir(tmp_path / "alpha.gguf", progress=False) == two_entries[0]


# ----------------------------------------------------------------------------- permissions


def test_atomic_dir_modes_and_failure(tmp_path):
    out = tmp_path / "a" / "ckpt"
    with fileio.atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert _mode(out) == 0o777 & ~_umask() and _mode(out / "config.json") == 0o666 & ~_umask()
    with pytest.raises(RuntimeError):
        with fileio.atomic_dir(tmp_path / "b") as tmp:
            raise RuntimeError("boom")
    assert not (tmp_path / "b").exists() and not tmp.exists()
    with pytest.raises(OSError):  # a non-empty target is never replaced
        with fileio.atomic_dir(out) as tmp:
            (tmp / "other").write_text("x")
    assert sorted(os.listdir(out)) == ["config.json"] and not tmp.exists()
    (tmp_path / "empty").mkdir()
    with fileio.atomic_dir(tmp_path / "empty") as tmp:
        (tmp / "f").write_text("x")
    assert os.listdir(tmp_path / "empty") == ["f"]


def test_tokenizer_copies_get_the_umasks_mode(tmp_path):
    from lucidlm.checkpoints.hf import copy_tokenizer_files

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "tokenizer.json").write_text("{}")
    os.chmod(src / "tokenizer.json", 0o600)
    copy_tokenizer_files(src, dst)
    assert _mode(dst / "tokenizer.json") == 0o666 & ~_umask()


def test_doctests():
    for module in (cc, fileio):
        assert doctest.testmod(module).failed == 0
