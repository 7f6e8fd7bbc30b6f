"""The README's Python API snippet runs as written, with the command line's defaults."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_api_snippet() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_snippet_runs(tmp_path):
    """In a fresh interpreter, with an empty feature cache in a temporary folder: five tasks,
    each printed with its accuracy; a real pretrained backbone is far above chance (10 %)."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "-c", python_api_snippet()], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    lines = [line.split() for line in p.stdout.strip().splitlines()]
    assert [int(t) for t, _ in lines] == [0, 1, 2, 3, 4]
    assert float(lines[-1][1]) > 0.4, p.stdout
    shards = list((tmp_path / "cache" / "retain" / "features").rglob("*.safetensors"))
    assert shards, "Context() did not use the disk feature cache"
