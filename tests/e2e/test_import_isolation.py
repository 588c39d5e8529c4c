"""What a user imports loads only its own layers, seen in a fresh interpreter: the objective
heads without the engine, the losses without Lightning or timm, the evaluation protocols
without the commands or Hydra."""

from __future__ import annotations

import ast
import subprocess
import sys


def loaded_modules(statement: str) -> set[str]:
    """The modules that ``statement`` loads in a fresh interpreter."""
    code = f"{statement}\nimport sys\nprint(sorted(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=300)
    return set(ast.literal_eval(done.stdout.strip().splitlines()[-1]))


def test_heads_load_no_engine_module():
    """An objective head (and the bare losses) import without the training engine."""
    loaded = loaded_modules("import m3i_lightning.objectives.base, m3i_lightning.objectives, "
                            "m3i_lightning.components.losses")
    assert "m3i_lightning.objectives.base" in loaded
    assert not {m for m in loaded
                if m.startswith(("m3i_lightning.engine.", "m3i_lightning.config."))}
    assert not loaded & {"m3i_lightning.runtime.strategies", "m3i_lightning.components.masking",
                         "m3i_lightning.components.optim"}


def test_the_losses_load_neither_lightning_nor_timm():
    loaded = loaded_modules("import m3i_lightning.losses")
    assert "m3i_lightning.losses" in loaded
    assert not {"lightning", "timm"} & {name.split(".")[0] for name in loaded}


def test_the_evaluation_protocols_load_no_command_and_no_hydra():
    loaded = loaded_modules("from m3i_lightning.evaluation.protocols import run_protocols")
    assert "m3i_lightning.evaluation.protocols" in loaded
    assert not {m for m in loaded if m.startswith("m3i_lightning.commands")}
    assert not {m for m in loaded if m.split(".")[0] in ("hydra", "omegaconf")}
