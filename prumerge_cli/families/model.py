"""`FamilyEncoder`: a family checkpoint (LLaVA-NeXT, LLaVA-OneVision, InternVL, Gemma 3) loaded with transformers,
its image processor, its adapter, a reducer and a budget scope: images in, what the LM receives per image out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..dtypes import canonical, torch_dtype
from ..errors import PrumergeError
from ..lm.positions import check_positions
from ..models.loading import read_config
from ..models.weights import weight_files
from ..reducers import Reducer, build_reducer
from .base import FamilyAdapter
from .layout import DEFAULT_SCOPE, ImageLayout, ImageTokens, check_scope, reduce_image
from .registry import ADAPTERS

MODEL_TYPES = {"llava_next": "LlavaNextForConditionalGeneration",
               "llava_onevision": "LlavaOnevisionForConditionalGeneration",
               "internvl": "InternVLForConditionalGeneration", "gemma3": "Gemma3ForConditionalGeneration",
               "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
               "qwen3_vl": "Qwen3VLForConditionalGeneration"}  # fmt: skip


def is_family_checkpoint(model_dir: Path) -> bool:
    """Whether `model_dir`'s config names one of the families' model types."""
    return read_config(Path(model_dir)).get("model_type") in MODEL_TYPES


def is_family_target(target: Path) -> bool:
    """Whether `target` is a family checkpoint or a bundle of one."""
    from ..bundle import is_bundle, read_bundle

    if is_bundle(target):
        return "family" in read_bundle(target)
    return Path(target).is_dir() and (Path(target) / "config.json").is_file() and is_family_checkpoint(Path(target))


def family_settings(target: Path) -> tuple[str, str]:
    """The model type and budget scope of a family checkpoint (default scope) or bundle, read without loading."""
    from ..bundle import is_bundle, read_bundle

    if is_bundle(target):
        bundle = read_bundle(target)
        return bundle["family"], bundle.get("scope", DEFAULT_SCOPE)
    return read_config(Path(target))["model_type"], DEFAULT_SCOPE


def family_positions(model_type: str | None, positions: str | None) -> str:
    """`positions` checked for `model_type`: M-RoPE models keep their tokens' original 3-D positions (None gives
    them original, the others contiguous)."""
    mrope = model_type in MODEL_TYPES and ADAPTERS[MODEL_TYPES[model_type]].mrope
    positions = check_positions(positions or ("original" if mrope else "contiguous"))
    if mrope and positions != "original":
        raise PrumergeError(f"{MODEL_TYPES[model_type]} keeps its tokens' 3-D (M-RoPE) positions: positions must be "
                            "original")  # fmt: skip
    return positions


@dataclass
class LoadedFamily:
    """A family checkpoint, ready to run: the transformers model, its image processor and its weight files."""

    model_type: str
    hf_model: Any
    processor: Any
    weight_files: list[Path]


def load_family(model_dir: Path, dtype: str = "fp32") -> LoadedFamily:
    """Load a family checkpoint from a local directory, offline, from safetensors weights only."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    model_type = read_config(model_dir).get("model_type")
    if model_type not in MODEL_TYPES:
        raise PrumergeError(f"{model_dir} is a {model_type!r} checkpoint, not one of {', '.join(MODEL_TYPES)}")
    files = weight_files(model_dir)
    if any(f.suffix != ".safetensors" for f in files):
        raise PrumergeError(f"{model_dir}: family checkpoints are read from safetensors weights only")
    if not (model_dir / "preprocessor_config.json").is_file():
        raise PrumergeError(f"{model_dir} has no preprocessor_config.json; its tiles cannot be made without it")
    try:
        model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch_dtype(dtype),
                                                            local_files_only=True)  # fmt: skip
        processor = AutoImageProcessor.from_pretrained(str(model_dir), backend="pil", local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PrumergeError(f"{model_dir} cannot be loaded with transformers: {exc}") from None
    if type(model).__name__ != MODEL_TYPES[model_type]:
        raise PrumergeError(f"{model_dir} loads as {type(model).__name__}, not {MODEL_TYPES[model_type]}")
    return LoadedFamily(model_type, model.eval().requires_grad_(False), processor, files)


def prepare_images(processor: Any, images: list[Image.Image]) -> tuple[torch.Tensor, dict[str, Any]]:
    """A family image processor's pixel values of `images` and the other image inputs an adapter reads."""
    out = processor(images, return_tensors="pt")
    if "num_crops" in out and int(out["num_crops"].sum()) > 0:
        raise PrumergeError("Gemma 3's pan-and-scan crops are not supported; turn do_pan_and_scan off")
    return out["pixel_values"], {k: v for k, v in out.items()
                                 if k in ("image_sizes", "num_patches", "image_grid_thw")}  # fmt: skip


class FamilyEncoder:
    """Call `encode_images` to get each image's `ImageTokens` (projected, packed as the LM receives them)."""

    def __init__(self, model: LoadedFamily, reducer: Reducer, model_dir: Path, dtype: str = "fp32",
                 scope: str = DEFAULT_SCOPE, positions: str | None = None):  # fmt: skip
        self.model = model
        self.adapter: FamilyAdapter = ADAPTERS[MODEL_TYPES[model.model_type]](model.hf_model)
        self.reducer = reducer
        self.processor = model.processor
        self.model_dir = model_dir
        self.dtype_name = canonical(dtype)
        self.scope = check_scope(scope)
        self.positions = family_positions(model.model_type, positions)

    def with_reducer(self, reducer: Reducer, scope: str | None = None) -> FamilyEncoder:
        """Another encoder on the same loaded model."""
        return FamilyEncoder(self.model, reducer, self.model_dir, self.dtype_name, scope or self.scope,
                             self.positions)  # fmt: skip

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, method: str = "prumerge", *, dtype: str = "fp32",
                        scope: str = DEFAULT_SCOPE, positions: str | None = None,
                        **params: Any) -> FamilyEncoder:  # fmt: skip
        """Load a family checkpoint and attach reducer `method` applied with `scope` at `positions` (default:
        original for M-RoPE models, whose 3-D positions are kept, contiguous for the others)."""
        reducer = build_reducer(method, **params)
        check_scope(scope)
        positions = family_positions(read_config(Path(model_dir)).get("model_type"), positions)  # before loading
        return cls(load_family(Path(model_dir), dtype), reducer, Path(model_dir).resolve(), dtype, scope, positions)

    def to(self, device: Any) -> FamilyEncoder:
        """Move the model to `device`; returns self."""
        self.model.hf_model.to(device)
        return self

    @property
    def method_label(self) -> str:
        """The method's name, marked where its score is not PruMerge's [CLS] row (a received-attention variant)."""
        name = self.reducer.name
        return name if self.adapter.cls_score or not self.reducer.needs_scores else f"{name} (received attention)"

    @property
    def family(self) -> str:
        """The checkpoint's model type (llava_next, llava_onevision, internvl, gemma3)."""
        return self.model.model_type

    def prepare(self, images: list[Image.Image]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The processor's pixel values of `images` and the other image inputs the adapter reads."""
        return prepare_images(self.processor, images)

    @torch.no_grad()
    def layouts(self, images: list[Image.Image]) -> tuple[torch.Tensor, list[ImageLayout]]:
        """The pixel values of `images` and each one's layout (tiles with scores when the reducer needs them)."""
        pixel_values, inputs = self.prepare(images)
        return pixel_values, self.layouts_of(pixel_values, inputs)

    @torch.no_grad()
    def layouts_of(self, pixel_values: torch.Tensor, inputs: dict[str, Any]) -> list[ImageLayout]:
        """Each image's layout from the processor's outputs (`prepare`)."""
        return self.adapter.layouts(None, pixel_values, dict(inputs), self.reducer.needs_scores)  # type: ignore[arg-type]

    def reduce_layouts(self, layouts: list[ImageLayout]) -> list[ImageTokens]:
        """What the LM receives for each image of `layouts`."""
        with torch.no_grad():
            return [reduce_image(layout, self.reducer, self.scope) for layout in layouts]  # type: ignore[arg-type]

    def encode_images(self, images: list[Image.Image]) -> list[ImageTokens]:
        """What the LM receives for each image."""
        return self.encode_prepared(*self.prepare(images))

    def encode_prepared(self, pixel_values: torch.Tensor, inputs: dict[str, Any]) -> list[ImageTokens]:
        """`encode_images` from the image processor's outputs (`prepare`)."""
        return self.reduce_layouts(self.layouts_of(pixel_values, inputs))

    def tile_pixels(self, pixel_values: torch.Tensor, layouts: list[ImageLayout]) -> list[torch.Tensor]:
        """Each image's pixel tiles [t, 3, H, W], the base (or only) one first, from the processor's batch."""
        return self.adapter.pixel_tiles(pixel_values, layouts)

    def settings(self) -> dict[str, Any]:
        """What a bundle records to rebuild this encoder."""
        return {"method": self.reducer.name, "params": self.reducer.params(), "dtype": self.dtype_name,
                "score_layer": None, "score_dtype": "float32", "positions": self.positions, "scope": self.scope,
                "family": self.family}  # fmt: skip

    def save(self, bundle_dir: str | Path, force: bool = False) -> Path:
        """Write a bundle (`reducer.json`) that `prumerge_cli.load` and `patch` read back."""
        from ..bundle import write_bundle

        return write_bundle(self, Path(bundle_dir), force=force)  # type: ignore[arg-type]
