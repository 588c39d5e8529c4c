"""Relative queries: the decoder shared by the inter-view objectives (nvs, sim_pixel, sim_feat).

An inter-view objective encodes one crop and predicts every patch of another crop of the same
image. Its decoder gets one query per target patch, placed at that patch's position in the
input view's grid (SiameseIM), so the decoder knows which part of the encoded input (if any)
shows the content it must produce.
"""

from __future__ import annotations

from torch import Tensor, nn

from m3i_lightning.components.geometry import relative_geometry
from m3i_lightning.components.predictor import TokenPredictor
from m3i_lightning.core.encoded import Encoded
from m3i_lightning.objectives.base import Objective, Targets


class RelativePredictor(nn.Module):
    """A :class:`~m3i_lightning.components.predictor.TokenPredictor` whose queries are the
    target view's patches: the sin-cos embedding of their coordinates in the input grid, plus a
    learned projection of the target's relative log-scale and flip (SiameseIM adds relative position
    and scale to its mask-token queries).

    The projection starts at zero, so at the identity crop the queries are exactly the input
    tokens' own position embeddings, as in an intra-view (MAE) decoder.
    """

    def __init__(self, in_dim: int, out_dim: int, grid_size: tuple[int, int], dim: int,
                 depth: int, num_heads: int, **decoder) -> None:
        super().__init__()
        self.grid_size, self.dim = tuple(grid_size), dim
        self.decoder = TokenPredictor(in_dim, out_dim, grid_size, dim, depth, num_heads,
                                      **decoder)
        self.view_code = nn.Linear(dim + 1, dim)
        nn.init.zeros_(self.view_code.weight)
        nn.init.zeros_(self.view_code.bias)

    def queries(self, input_geometry: Tensor, target_geometry: Tensor) -> Tensor:
        """Query positions [B, N, dim] of all N target patches, crops' geometry [B, 5]."""
        rel = relative_geometry(input_geometry, target_geometry)
        code = self.view_code(rel.code(self.dim))
        return rel.positions(self.grid_size, self.dim) + code.unsqueeze(1)

    def forward(self, encoded: Encoded, input_geometry: Tensor, target_geometry: Tensor,
                prefix: Tensor | None = None) -> Tensor:
        """Predictions [B, N, out_dim] for every patch of the target view, row-major;
        ``prefix`` [B, P, in_dim]: tokens of no grid position the decoder also reads."""
        query = self.queries(input_geometry, target_geometry)
        return self.decoder(encoded.tokens, encoded.visible_index, query, prefix=prefix)


class RelativeQueryObjective(Objective):
    """Base of the objectives that decode every patch of one view from another view through
    relative queries (:class:`RelativePredictor`).

    Natively the input is view2 and the target view1; in the shared input mode the engine
    swaps them (input view1, target view2). :meth:`predict` reads the two crops' geometry from
    whichever views the engine routed, so the relative queries follow. The predictor defaults
    are SiameseIM's ViT-B decoder (width 768, 4 blocks, 16 heads).

    Args:
        predictor_dim: width of the relative-query decoder.
        predictor_depth: its blocks.
        predictor_heads: its attention heads.
        **kwargs: the options of every objective
        (:class:`~m3i_lightning.objectives.base.Objective`): ``weight``, and the backbone's
        ``embed_dim``, ``grid_size``, ``patch_size``.
    """

    input_view = "view2"
    target_view = "view1"
    requires = frozenset({"geometry"})

    def __init__(self, predictor_dim: int = 768, predictor_depth: int = 4,
                 predictor_heads: int = 16, **kwargs) -> None:
        super().__init__(**kwargs)
        self.predictor_shape = (predictor_dim, predictor_depth, predictor_heads)

    def relative_predictor(self, out_dim: int, **decoder) -> RelativePredictor:
        """The decoder, once a subclass knows its output size (``decoder``: TokenPredictor's
        projector and norm)."""
        return RelativePredictor(self.embed_dim, out_dim, self.grid_size, *self.predictor_shape,
                                 **decoder)

    def predict(self, batch: dict, encoded: Encoded, targets: Targets) -> Tensor:
        """The predictor's output [B, N, out_dim] for every patch of the target view."""
        geometry = [batch[f"{view}_geometry"] for view in (targets.input_view, targets.view)]
        return self.predictor(encoded, *geometry, prefix=self.decoder_prefix(encoded))

    def decoder_prefix(self, encoded: Encoded) -> Tensor | None:
        """Tokens of no grid position the decoder reads before the encoded patches: none."""
        return None

