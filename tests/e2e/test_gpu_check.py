"""scripts/gpu_check.sh on CPU: the one command writes one JSON file with every row, measured
on the tiny model where CPU can, ``skipped: needs CUDA`` where only a GPU can."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from helpers import REPO

SCRIPTS = REPO / "scripts"


def row_names() -> list[str]:
    spec = importlib.util.spec_from_file_location("m3i_gpu_check_rows", SCRIPTS / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.row_names()


def test_gpu_check_writes_every_row_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(SCRIPTS / "gpu_check.sh"), str(out), "--workers", "0",
                           "--repeats", "1", "--warmup", "0", "--loader-batches", "1"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    names = row_names()
    assert list(rows) == names and len(names) == 9
    cuda_only = [n for n in names if "compiled" in n or n.startswith("fsdp")]
    assert all(rows[n] == "skipped: needs CUDA" for n in cuda_only)
    for name in set(names) - set(cuda_only):
        row = rows[name]
        assert isinstance(row, dict), (name, row)
        if name.startswith("loader"):
            assert row["loader_images_per_s"] > 0 and row["ratio"] > 0
        else:
            assert row["images_per_s"] > 0 and row["tflops_per_step"] > 0
            assert row["mfu"] is None  # no peak known for a CPU
