"""An image as the LM sees it, split into the regions a reducer sees at once (tiles), and packed back after the
reduction: kept tokens in the order of the unreduced layout, a newline after every row that keeps a token, and
each tile's merged extra token at the image's end."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..errors import PrumergeError
from ..reducers import EXTRA_INDEX, Reducer, TowerSignals

Scope = Literal["tile", "image"]
SCOPES: tuple[str, ...] = ("tile", "image")
DEFAULT_SCOPE: Scope = "tile"
"""Per tile: a tile's [CLS] softmax (or received attention) sums over that tile alone, so one IQR fence per tile
compares like with like, every tile keeps its share of the image (the peers' "32 x 5" budgets), and a tile has
the fixed shape an export needs."""
SCOPE_HELP = "Budget of a tiled image: per 'tile' or over the whole 'image'"


def check_scope(scope: str) -> Scope:
    """`scope` if it is a known setting, else a `PrumergeError`."""
    if scope not in SCOPES:
        raise PrumergeError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    return scope  # type: ignore[return-value]


@dataclass
class Tile:
    """One region reduced at once: its tokens the LM would see [n, D], their scores [n] and keys [n, Ck] (None
    when the reducer needs none), its (rows, cols) grid, each token's place in the unreduced layout [n], and
    where each token comes from: its pixel tile among the image's (`sources`, -1 where none survives, as in a
    downscaled grid) and its cell in that tile's grid of LM tokens (`cells`)."""

    tokens: torch.Tensor
    scores: torch.Tensor | None
    keys: torch.Tensor | None
    grid: tuple[int, int]
    places: torch.Tensor
    sources: torch.Tensor
    cells: torch.Tensor


@dataclass
class ImageLayout:
    """An image's tiles and its unreduced layout: `span` places, the (rows, cols) of LM tokens of each pixel tile,
    the newline token (None where the family has none), the row each place belongs to (-1: no newline follows its
    row), the place of each row's newline, and how the pixel tiles after the base one are arranged (rows, cols;
    None: side by side)."""

    tiles: list[Tile]
    span: int
    token_grid: tuple[int, int]
    newline: torch.Tensor | None = None
    row_of: torch.Tensor | None = None
    newline_places: torch.Tensor | None = None
    tile_grid: tuple[int, int] | None = None
    side: dict[str, torch.Tensor] | None = None
    """Per-token features beside the tokens, by place [span, ...] (Qwen3-VL's deepstack features): cut to the
    kept tokens with them, zeros for a merged extra token."""


@dataclass
class ImageTokens:
    """What the LM receives for one image: tokens [k, D], each one's place in the unreduced layout [k] (its
    position there under `positions=original`), the unreduced length `span`, the count each reduced region
    keeps (its extra token included) and the pixel tile and cell of every kept token but the extra ones."""

    tokens: torch.Tensor
    places: torch.Tensor
    span: int
    kept_per_tile: list[int]
    kept_sources: torch.Tensor
    kept_cells: torch.Tensor
    side: dict[str, torch.Tensor] = field(default_factory=dict)


def merged_tiles(tiles: list[Tile], reducer: Reducer) -> Tile:
    """All of an image's tiles as one region (`scope=image`): their tokens in tile order, one row of a grid."""
    if reducer.name == "pool":
        raise PrumergeError("pool pools each tile's grid; scope=image has no grid to pool (use scope=tile)")
    scores = None if tiles[0].scores is None else torch.cat([t.scores for t in tiles])  # type: ignore[misc]
    keys = None if tiles[0].keys is None else torch.cat([t.keys for t in tiles])  # type: ignore[misc]
    tokens = torch.cat([t.tokens for t in tiles])
    return Tile(tokens, scores, keys, (1, tokens.shape[0]), *(torch.cat([getattr(t, name) for t in tiles])
                                                              for name in ("places", "sources", "cells")))  # fmt: skip


def reduce_tile(tile: Tile, reducer: Reducer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tile's kept tokens [k, D], their places [k] (`EXTRA_INDEX` for a merged extra token) and the indices
    of the tile's kept tokens but the extra one."""
    signals = TowerSignals(tile.tokens[None], None if tile.scores is None else tile.scores[None],
                           None if tile.keys is None else tile.keys[None], tile.grid)  # fmt: skip
    out = reducer(signals).row(0)
    indices = out.indices[0]
    places = torch.where(indices == EXTRA_INDEX, EXTRA_INDEX, tile.places[indices.clamp(min=0)])
    return out.tokens[0], places, indices[indices >= 0]


def reduce_image(layout: ImageLayout, reducer: Reducer, scope: Scope) -> ImageTokens:
    """Reduce an image's tiles (each alone, or all at once) and pack what they keep."""
    tiles = layout.tiles if scope == "tile" or len(layout.tiles) == 1 else [merged_tiles(layout.tiles, reducer)]
    kept = [reduce_tile(tile, reducer) for tile in tiles]
    kept_sources = torch.cat([tile.sources[k[2]] for tile, k in zip(tiles, kept, strict=True)])
    kept_cells = torch.cat([tile.cells[k[2]] for tile, k in zip(tiles, kept, strict=True)])
    tokens = torch.cat([k[0] for k in kept])
    places = torch.cat([k[1] for k in kept])
    extra = places == EXTRA_INDEX
    cells, cell_places = tokens[~extra], places[~extra]
    if layout.newline is not None:
        assert layout.row_of is not None and layout.newline_places is not None
        rows = layout.row_of[cell_places]
        rows = torch.unique(rows[rows >= 0])
        lines = layout.newline_places[rows]
        cells = torch.cat([cells, layout.newline.to(cells.dtype).expand(len(lines), -1)])
        cell_places = torch.cat([cell_places, lines])
    order = torch.argsort(cell_places, stable=True)
    extras = tokens[extra]
    packed = torch.cat([cells[order], extras])
    packed_places = torch.cat([cell_places[order], torch.full((len(extras),), layout.span - 1)])
    side = {name: torch.cat([values[cell_places[order]], values.new_zeros(len(extras), *values.shape[1:])])
            for name, values in (layout.side or {}).items()}  # fmt: skip
    return ImageTokens(packed, packed_places, layout.span, [len(k[0]) for k in kept], kept_sources, kept_cells,
                       side)  # fmt: skip
