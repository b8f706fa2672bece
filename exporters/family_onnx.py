"""`prumerge export --onnx` for the families whose tiles are one fixed square (Gemma 3: one 896 px tile per image;
InternVL: 448 px tiles): tower, the family's pooling or pixel shuffle, projector and reducer as one graph over a
batch of tiles, each reduced alone. The host keeps what is per image: cutting images into tiles (the image
processor, saved beside the graph) and packing each image's kept tokens into its prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..devices import module_device
from ..errors import PrumergeError
from ..families.model import MODEL_TYPES, FamilyEncoder
from ..families.registry import ADAPTERS
from ..progress import Phases
from .onnx_export import SAMPLE_BATCH, GraphFacts, OnnxOptions, sample_pixels, write_export


class FamilyTileModule(nn.Module):
    """pixel_values [T, 3, S, S] (tiles) -> tokens [T, Kmax, D] as the LM receives them, lengths [T], indices
    [T, Kmax] into each tile's grid of LM tokens."""

    def __init__(self, encoder: FamilyEncoder):
        super().__init__()
        adapter = encoder.adapter
        self.tower, self.projector = adapter.tower, adapter.projector  # registered: their weights are the graph's
        self.adapter = adapter
        self.grid = (adapter.side, adapter.side)
        self.reducer = encoder.reducer.for_export(adapter.side * adapter.side)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.reducer.reduce(self.adapter.tile_signals(pixel_values, self.reducer.needs_scores))
        return out.tokens, out.lengths, out.indices


def check_family_export(model_type: str, scope: str, options: OnnxOptions) -> None:
    """Refuse, in one line and before loading anything, what the tile graph of a `model_type` checkpoint reduced
    with budget `scope` cannot be."""
    adapter = ADAPTERS[MODEL_TYPES[model_type]]
    if not adapter.fixed_tiles:
        raise PrumergeError(f"{adapter.host}: its tiles are cut to each image's aspect (or its resolution is "
                            "dynamic) and packed on the host, so no fixed-shape graph exports; Gemma 3 and InternVL "
                            "export, and every family runs with `prumerge_cli.patch` or on torch in bench")  # fmt: skip
    if scope != "tile" and model_type != "gemma3":  # Gemma 3 has one tile an image: its scopes agree
        raise PrumergeError(f"{adapter.host}: the graph reduces each tile alone; a --scope image bundle budgets "
                            "over an image's tiles, so export a --scope tile one")  # fmt: skip
    if options.dtype != "fp32" or options.plugins:
        raise PrumergeError(f"{adapter.host}: a family's graph exports in fp32 without plugin nodes")


def export_family_onnx(encoder: FamilyEncoder, out_dir: Path, options: OnnxOptions, force: bool = False,
                       phases: Phases | None = None) -> dict[str, Any]:  # fmt: skip
    """Export the tile graph of `encoder`, check ONNX Runtime against PyTorch and write `out_dir`; returns the
    manifest."""
    check_family_export(encoder.family, encoder.scope, options)
    if encoder.dtype_name != "fp32":
        raise PrumergeError(f"{encoder.adapter.host}: a family's graph exports from an fp32 tower, not "
                            f"{encoder.dtype_name}")  # fmt: skip
    module = FamilyTileModule(encoder).eval()
    side = int(encoder.processor.size["height"])
    sample = sample_pixels(options.batch or SAMPLE_BATCH, side, torch.float32).to(module_device(module))
    facts = GraphFacts(
        side, module.grid[0] * module.grid[1], module.grid, encoder.adapter.config.text_config.hidden_size,
        encoder.positions, encoder.reducer.params(), True, "float32", "float32",
        {"model": str(encoder.model_dir), "model_type": encoder.family, "scope": "tile",
         "score": encoder.method_label}, batch_name="tiles",
    )  # fmt: skip
    return write_export(module, sample, options, facts, encoder.processor, out_dir, force, phases)
