"""The predictors' hyper-parameters (the official `sparse_config`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import PrumergeError


@dataclass(frozen=True)
class SparseConfig:
    """Where the predictors sit, how wide they are, and the keep-rate targets of training."""

    sparse_layer: int = 2
    d_model: int = 512
    nhead: int = 8
    dim_feedforward: int = 2048
    num_layers: int = 2
    text_hidden: tuple[int, int, int] = (512, 256, 128)
    vision_keep_rate: float = 0.2
    output_keep_rate: float = 0.5
    output_len_for_training: int = 50
    mask_loss_weight: float = 100.0

    def __post_init__(self) -> None:
        if not 0 < self.vision_keep_rate <= 1 or not 0 < self.output_keep_rate <= 1:
            raise PrumergeError("keep rates must be in (0, 1]")
        if self.d_model % self.nhead or self.d_model % 2:
            raise PrumergeError(f"d_model {self.d_model} must be even and divisible by nhead {self.nhead}")
        if self.sparse_layer < 1:
            raise PrumergeError("sparse_layer must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        record = asdict(self)
        record["text_hidden"] = list(self.text_hidden)
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> SparseConfig:
        """Inverse of `to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(record) - known
        if unknown:
            raise PrumergeError(f"unknown sparse_config keys: {', '.join(sorted(unknown))}")
        values = dict(record)
        if "text_hidden" in values:
            values["text_hidden"] = tuple(values["text_hidden"])
        return cls(**values)

    def vision_keep(self, image_tokens: int) -> int:
        """Image tokens kept at prefill: floor(rate * N), at least one."""
        return max(1, int(image_tokens * self.vision_keep_rate))
