"""The six commands are console scripts of the installed package, each resolving to the
``main`` of its command module."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

COMMANDS = {"m3i-pretrain": "pretrain", "m3i-eval": "eval", "m3i-export": "export",
            "m3i-finetune": "finetune", "m3i-consolidate": "consolidate", "m3i-ablate": "ablate"}


def test_each_console_script_resolves_to_its_commands_main():
    scripts = {e.name: e for e in entry_points(group="console_scripts")
               if e.name.startswith("m3i-")}
    assert set(scripts) == set(COMMANDS)
    for name, command in COMMANDS.items():
        main = scripts[name].load()
        assert callable(main), name
        assert main is importlib.import_module(f"m3i_lightning.commands.{command}").main, name
