"""The README's "In Python" snippet runs as written (#31, item 24), read from the README as the
Tour is, with CPU-sized heads: two steps of each fit, so a change of the snippet or of the
Python API it shows breaks this test, and a snippet too slow for a CPU shows in its time."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from helpers import REPO

pytestmark = pytest.mark.tour

# Every Trainer of the snippet stops after two steps, quietly, on the CPU.
SHORT = """
import functools, lightning as L
L.Trainer = functools.partial(L.Trainer, max_steps=2, limit_val_batches=0, logger=False,
                              enable_checkpointing=False, enable_progress_bar=False,
                              accelerator="cpu")
"""


def python_snippet() -> str:
    text = (REPO / "README.md").read_text()
    return re.search(r"In Python,.*?```python\n(.*?)```", text, re.S).group(1)


def test_the_python_snippet_runs_as_written(tmp_path):
    snippet = python_snippet()
    assert "small = dict(" in snippet  # the heads are sized for a CPU
    script = tmp_path / "snippet.py"
    script.write_text(SHORT + snippet)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "module(s) in eval mode" not in done.stderr
