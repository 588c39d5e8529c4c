"""Hydra configs, importable so they ship inside the wheel and are found from any directory."""

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent
