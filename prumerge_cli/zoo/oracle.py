"""The oracle reduction of the embedded world: keep the patches that cover the objects (it reads the scene, so it
is a yardstick, not a method). At a budget it keeps a share of every object's patches, then fills up with
background patches drawn by a seed; measured beside a random subset of the same size it tells whether the choice
of tokens matters to the model at all."""

from __future__ import annotations

import itertools
import random

import torch

from ..encoder import ReducedVisionEncoder
from ..reducers import ReducedTokens
from .world import Box, Sample


def box_area(box: Box, side: int, patch: int) -> torch.Tensor:
    """[side * side] pixels of each patch (raster order) that lie inside one bounding box."""
    x0, y0, x1, y1 = box
    edges = torch.arange(side + 1, dtype=torch.float32) * patch
    width = (edges[1:].clamp(max=x1) - edges[:-1].clamp(min=x0)).clamp(min=0)
    height = (edges[1:].clamp(max=y1) - edges[:-1].clamp(min=y0)).clamp(min=0)
    return (height[:, None] * width[None, :]).flatten()


def covered_area(sample: Sample, side: int, patch: int) -> torch.Tensor:
    """[side * side] pixels of each patch (raster order) that lie inside an object's bounding box."""
    return sum((box_area(box, side, patch) for box in sample.boxes), torch.zeros(side * side))


def oracle_patches(sample: Sample, budget: int, side: int, patch: int, seed: int = 0) -> list[int]:
    """`budget` patches in raster order: those covering objects, one object at a time in turn (each object's
    patches the most covered first, so that a small budget keeps a part of every object), then random background."""
    queues = []
    for box in sample.boxes:
        area = box_area(box, side, patch)
        queues.append([int(i) for i in torch.argsort(area, descending=True, stable=True) if area[i] > 0])
    kept: dict[int, None] = {}
    for turn in itertools.zip_longest(*queues):
        kept.update(dict.fromkeys(i for i in turn if i is not None))
    covering = list(kept)[:budget]
    background = [i for i in range(side * side) if i not in kept]
    fill = random.Random(seed).sample(background, min(len(background), budget - len(covering)))
    return sorted(covering + fill)


class OracleTokens:
    """Samples -> the projected tokens of their object patches (`budget` per image), placed as `encoder` places
    reduced tokens (`encoder` keeps every patch: method `none`)."""

    def __init__(self, encoder: ReducedVisionEncoder, budget: int, seed: int = 0):
        if encoder.reducer.name != "none":
            raise ValueError("the oracle selects from every patch: give it an encoder with method 'none'")
        self.encoder, self.budget, self.seed = encoder, budget, seed

    def __call__(self, samples: list[Sample]) -> ReducedTokens:
        full = self.encoder.encode_images([s.image for s in samples], project=True)
        side = self.encoder.grid[0]
        patch = self.encoder.image_size // side
        chosen = torch.tensor([oracle_patches(s, self.budget, side, patch, self.seed) for s in samples])
        tokens = full.tokens.gather(1, chosen[..., None].expand(-1, -1, full.tokens.shape[-1]))
        lengths = torch.full((len(samples),), chosen.shape[1], dtype=torch.long)
        return ReducedTokens(tokens, lengths, chosen, span=full.span)
