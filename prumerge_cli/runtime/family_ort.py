"""`FamilyOrtEncoder`: a Gemma 3 or InternVL tile graph (`prumerge export --onnx`) run by ONNX Runtime, each
image's tiles packed on the host into the `ImageTokens` the torch `FamilyEncoder` gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..errors import PrumergeError
from ..families.layout import ImageTokens
from ..families.model import MODEL_TYPES, prepare_images
from ..reducers import EXTRA_INDEX, ReducedTokens
from .ort import OrtEncoder, read_manifest


def is_family_export(path: str | Path) -> bool:
    """Whether the export at `path` is a family's tile graph."""
    return read_manifest(path)["source"]["model_type"] in MODEL_TYPES


def pack_tiles(reduced: ReducedTokens, per_tile: int) -> ImageTokens:
    """One image's tiles, reduced each alone, packed as the LM receives them: the kept tokens in their places in
    the unreduced layout (tile after tile), then each tile's merged extra token."""
    cells, places, extras, kept_cells, kept_sources = [], [], [], [], []
    for t in range(len(reduced.lengths)):
        n = int(reduced.lengths[t])
        index, tokens = reduced.indices[t, :n], reduced.tokens[t, :n]
        kept = index != EXTRA_INDEX
        cells.append(tokens[kept])
        places.append(t * per_tile + index[kept])
        extras.append(tokens[~kept])
        kept_cells.append(index[kept])
        kept_sources.append(torch.full((int(kept.sum()),), t))
    cell_places = torch.cat(places)
    order = torch.argsort(cell_places, stable=True)
    span = len(reduced.lengths) * per_tile
    extra = torch.cat(extras)
    return ImageTokens(torch.cat([torch.cat(cells)[order], extra]),
                       torch.cat([cell_places[order], torch.full((len(extra),), span - 1)]), span,
                       reduced.lengths.tolist(), torch.cat(kept_sources), torch.cat(kept_cells))  # fmt: skip


class FamilyOrtEncoder:
    """`encode_images` gives each image's `ImageTokens`, as `FamilyEncoder.encode_images` does with torch."""

    def __init__(self, out_dir: str | Path, threads: int | None = None, providers: list[Any] | None = None):
        if not is_family_export(out_dir):
            raise PrumergeError(f"{out_dir} is not a family's tile graph")
        self.graph = OrtEncoder(out_dir, threads, providers)
        self.manifest = self.graph.manifest
        self.processor = self.graph.processor
        self.reducer = self.graph.reducer
        self.family: str = self.manifest["source"]["model_type"]
        self.method_label: str = self.manifest["source"]["score"]
        self.scope = "tile"
        self.per_tile: int = self.manifest["num_patches"]

    def encode_images(self, images: list[Image.Image]) -> list[ImageTokens]:
        """What the LM receives for each image."""
        return self.encode_prepared(*prepare_images(self.processor, images))

    def encode_prepared(self, pixel_values: torch.Tensor, inputs: dict[str, Any]) -> list[ImageTokens]:
        """`encode_images` from the image processor's outputs (`prepare_images`)."""
        counts = inputs.get("num_patches", torch.ones(len(pixel_values), dtype=torch.long)).tolist()
        reduced = self.graph(pixel_values)
        packed, start = [], 0
        for count in counts:
            packed.append(pack_tiles(reduced.select(torch.arange(start, start + count)), self.per_tile))
            start += count
        return packed
