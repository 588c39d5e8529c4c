"""MLP heads of the global objectives, built one way so projectors and predictors stay alike."""

from __future__ import annotations

from torch import nn

NORMS = {"bn": nn.BatchNorm1d, "ln": nn.LayerNorm, None: None}


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2,
        norm: str | None = None, act: type[nn.Module] = nn.GELU) -> nn.Sequential:
    """``num_layers`` linear layers with [norm →] activation between them, none after the last.

    This is the shape of the projectors and predictors of DINO (GELU, no norm), BYOL / SimSiam
    (BatchNorm, ReLU) and MSN (LayerNorm, GELU); ``norm`` is ``'bn'``, ``'ln'`` or None.
    """
    if num_layers < 1:
        raise ValueError(f"an MLP head needs at least one layer, got {num_layers}")
    if norm not in NORMS:
        raise ValueError(f"unknown head norm '{norm}'; choose one of {list(NORMS)}")
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(d_in, d_out))
        if i < num_layers - 1:
            if norm is not None:
                layers.append(NORMS[norm](d_out))
            layers.append(act())
    return nn.Sequential(*layers)
