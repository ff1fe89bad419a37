"""The README's Python snippet runs on a fresh directory and prints what it computes."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def python_api_snippet() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_python_api_snippet_runs_and_prints(tmp_path):
    done = subprocess.run([sys.executable, "-c", python_api_snippet()], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "torch.Size([1, 5, 49152])" in out and "Paris" in out
    assert "perplexity" in out.lower()
    assert "\x1b[" not in out  # piped: no escape codes
    assert "method attnlrp" in out
    assert (tmp_path / "heatmap.html").is_file() and (tmp_path / "heatmap.png").is_file()
    assert (tmp_path / "run" / "adapter_config.json").is_file()
