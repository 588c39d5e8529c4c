"""Hydra configs, importable so they ship inside the wheel and are found from any directory."""
