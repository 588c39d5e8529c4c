"""Scoring a trained encoder: kNN, linear probe, zero-shot, segmentation probe, online monitors and
the protocols that run them. Takes plain options and an injected fine-tuning callable, so it never
imports Hydra, the config layer or a command."""
