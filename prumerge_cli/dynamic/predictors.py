"""The two learned predictors of Dynamic-LLaVA. Both read the residual stream entering decoder layer
`sparse_layer` and emit two logits per token, channel 0 = keep."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .config import SparseConfig


class PredictorBlock(nn.Module):
    """Pre-norm ViT block: bidirectional multi-head attention (no qkv bias) and a GELU MLP."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`key_mask [B, N]` (True = real token) hides padding from the attention."""
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.norm2(x))


class VisionPredictor(nn.Module):
    """Image-token predictor: down-projection, ViT blocks, local/global split, MLP to two logits."""

    def __init__(self, hidden_size: int, config: SparseConfig):
        super().__init__()
        d = config.d_model
        self.down = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, d), nn.GELU())
        self.blocks = nn.ModuleList(
            PredictorBlock(d, config.nhead, config.dim_feedforward) for _ in range(config.num_layers)
        )
        self.head = nn.Sequential(
            nn.Linear(d, d // 2), nn.GELU(), nn.Linear(d // 2, d // 4), nn.GELU(), nn.Linear(d // 4, 2)
        )

    def forward(self, image_states: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """`image_states [B, N, H]` -> logits `[B, N, 2]`; `valid [B, N]` marks real tokens (default: all)."""
        if valid is None:
            valid = torch.ones(image_states.shape[:2], dtype=torch.bool, device=image_states.device)
        weight = valid[..., None].to(image_states.dtype)
        y = self.down(image_states) * weight
        for block in self.blocks:
            y = block(y, valid)
        half = y.shape[-1] // 2
        pooled = (y[..., half:] * weight).sum(1, keepdim=True) / weight.sum(1, keepdim=True).clamp_min(1)
        return self.head(torch.cat([y[..., :half], pooled.expand(-1, y.shape[1], -1)], dim=-1))


class TextPredictor(nn.Module):
    """Output-token predictor: a per-token MLP, so that each generated token is judged on its own."""

    def __init__(self, hidden_size: int, config: SparseConfig):
        super().__init__()
        widths = (hidden_size, *config.text_hidden)
        layers: list[nn.Module] = [nn.LayerNorm(hidden_size)]
        for a, b in itertools.pairwise(widths):
            layers += [nn.Linear(a, b), nn.GELU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(widths[-1], 2))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """`[..., H]` -> logits `[..., 2]`."""
        return self.mlp(states)


class Predictors(nn.Module):
    """Both predictors, initialised as Hugging Face initialises Linear layers (N(0, 0.02), zero bias)."""

    def __init__(self, hidden_size: int, config: SparseConfig, seed: int = 0):
        super().__init__()
        self.config = config
        generator = torch.Generator().manual_seed(seed)
        self.vision = VisionPredictor(hidden_size, config)
        self.text = TextPredictor(hidden_size, config)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                with torch.no_grad():
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.02)
                    if module.bias is not None:
                        module.bias.zero_()


def keep_decision(logits: torch.Tensor) -> torch.Tensor:
    """Inference rule for output tokens: keep when logit 0 beats logit 1."""
    return logits[..., 0] > logits[..., 1]


def keep_score(logits: torch.Tensor) -> torch.Tensor:
    """Ranking score of image tokens: log-probability of keep."""
    return torch.log_softmax(logits.float(), dim=-1)[..., 0]
