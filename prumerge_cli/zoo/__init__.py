"""The embedded default: a small CLIP and LLaVA trained here on a procedural visual-QA world."""

from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent
CLIP_DIR = ZOO_DIR / "clip"
LLAVA_DIR = ZOO_DIR / "llava"
MODEL_CARD = ZOO_DIR / "MODEL_CARD.md"
FINETUNED_DIR = ZOO_DIR / "finetuned"
