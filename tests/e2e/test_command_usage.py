"""The installed console scripts take ``key=value`` overrides like every command: export and
consolidate without their arguments end in one usage line (exit code 2) and write nothing,
no run folder and no log, where they run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(("script", "usage"), [
    ("m3i-export", "checkpoint=PATH out=DIR"),
    ("m3i-consolidate", "checkpoint=SRC out=DST"),
])
def test_a_command_without_its_arguments_is_one_usage_line_and_writes_nothing(script, usage,
                                                                               tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run([str(BIN / script), f"out={tmp_path / 'out'}"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: usage:") and usage in lines[0]
    assert list(tmp_path.iterdir()) == []
