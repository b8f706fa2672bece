"""An analytic cost model of a Llama-family LLM's prefill as a function of the visual-token count.

For a sequence of T tokens (visual + text), hidden size H, MLP width I, L layers, A attention heads,
G key/value heads (head dim D, H / A unless the model sets it, as Gemma 3 does), vocabulary V and b bytes per
element:

- prefill FLOPs = L * (2T(2HAD + 2HGD) + 2T * 3HI + 4T^2 AD) + 2TV
  (q/o and k/v projections, the SwiGLU MLP, scores and weighted sum over all T keys, the LM head;
  one multiply-add = 2 FLOPs; the causal mask is not used to skip work, as in LLM-Viewer-style counts)
- KV-cache bytes = 2 L T G D b
- activation bytes = L * b * (T(4H + 2H + 3I) + 2 A T^2)
  (q, k, v, attention output and two norm outputs, the three MLP intermediates, and the attention
  scores before and after the softmax, summed over layers: what a framework that keeps per-layer
  activations holds at once, LLM-Viewer's accounting)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import PrumergeError


@dataclass(frozen=True)
class LlmShape:
    """The dimensions that set the cost of a Llama-family decoder."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    bytes_per_element: int = 2
    attention_head_dim: int = 0
    """The head dimension where it is not hidden / heads (0: hidden / heads)."""

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.hidden // self.heads


SHAPES: dict[str, LlmShape] = {
    "vicuna-7b": LlmShape(4096, 11008, 32, 32, 32, 32000),
    "vicuna-13b": LlmShape(5120, 13824, 40, 40, 40, 32000),
    "llama-3-8b": LlmShape(4096, 14336, 32, 32, 8, 128256),
    "mistral-7b": LlmShape(4096, 14336, 32, 32, 8, 32000),
    "qwen2-7b": LlmShape(3584, 18944, 28, 28, 4, 152064),
    "qwen2.5-7b": LlmShape(3584, 18944, 28, 28, 4, 151674),
    "gemma-3-4b": LlmShape(2560, 10240, 34, 8, 4, 262208, attention_head_dim=256),
    "qwen3-8b": LlmShape(4096, 12288, 36, 32, 8, 151936, attention_head_dim=128),
}
"""LLaVA-1.5-7B and -13B and LLaVA-v1.6-Vicuna-7B use Vicuna-7B/13B v1.5 (Llama-2 shapes); LLaVA-v1.6-Mistral-7B
Mistral-7B; LLaVA-NeXT-8B Llama-3-8B; LLaVA-OneVision-7B Qwen2-7B; InternVL3-8B and Qwen2.5-VL-7B Qwen2.5-7B;
Qwen3-VL-8B Qwen3-8B; Gemma 3 4B its own LM (8 heads of 256)."""

LLAVA_TEXT_TOKENS = 32
"""Text tokens assumed beside the image in the reference comparison (system prompt plus a short question)."""


def shape_named(spec: str) -> tuple[str, LlmShape]:
    """'vicuna-7b' or 'vicuna-7b:layers=2' -> (name, shape)."""
    name, _, options = spec.partition(":")
    if name not in SHAPES:
        raise PrumergeError(f"unknown LLM shape {name!r}; choose from {', '.join(SHAPES)}")
    shape = SHAPES[name]
    for option in filter(None, options.split(",")):
        key, _, value = option.partition("=")
        if key != "layers" or not value.isdigit() or int(value) < 1:
            raise PrumergeError(f"bad LLM shape option {option!r}; use layers=N")
        shape = LlmShape(**{**asdict(shape), "layers": int(value)})
    return name, shape


def prefill_flops(shape: LlmShape, tokens: int) -> float:
    """FLOPs of one prefill over `tokens` tokens."""
    h, t = shape.hidden, tokens
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    per_layer = 2 * t * (2 * h * q + 2 * h * kv) + 2 * t * 3 * h * shape.intermediate + 4 * t * t * q
    return shape.layers * per_layer + 2 * t * h * shape.vocab


def kv_cache_bytes(shape: LlmShape, tokens: int) -> int:
    """Bytes of the K and V caches after a prefill of `tokens` tokens (one sequence)."""
    return 2 * shape.layers * tokens * shape.kv_heads * shape.head_dim * shape.bytes_per_element


def activation_bytes(shape: LlmShape, tokens: int) -> int:
    """Bytes of the per-layer activations of one prefill, summed over layers."""
    h, t = shape.hidden, tokens
    per_layer = t * (6 * h + 3 * shape.intermediate) + 2 * shape.heads * t * t
    return shape.layers * per_layer * shape.bytes_per_element


def costs(shape: LlmShape, visual_tokens: float, text_tokens: int = LLAVA_TEXT_TOKENS) -> dict[str, float]:
    """All three costs for a sequence of `visual_tokens` + `text_tokens`."""
    t = round(visual_tokens) + text_tokens
    return {
        "tokens": t,
        "prefill_tflops": prefill_flops(shape, t) / 1e12,
        "kv_cache_mib": kv_cache_bytes(shape, t) / 2**20,
        "activation_gib": activation_bytes(shape, t) / 2**30,
    }


PUBLISHED = {"visual_tokens": (576, 32), "prefill_tflops": (9.3, 0.91), "activation_gib": (4.60, 0.28)}
"""PruMerge paper (LLM-Viewer roofline, LLaVA-1.5-7B fp16): 576 -> ~32 visual tokens."""


def compare_with_published(text_tokens: int = LLAVA_TEXT_TOKENS) -> list[dict[str, float]]:
    """Our model against the published LLaVA-1.5-7B figures at 576 and 32 visual tokens."""
    rows = []
    for i, visual in enumerate(PUBLISHED["visual_tokens"]):
        ours = costs(SHAPES["vicuna-7b"], visual, text_tokens)
        rows.append({
            "visual_tokens": visual,
            "prefill_tflops": ours["prefill_tflops"],
            "published_tflops": PUBLISHED["prefill_tflops"][i],
            "activation_gib": ours["activation_gib"],
            "published_activation_gib": PUBLISHED["activation_gib"][i],
            "kv_cache_mib": ours["kv_cache_mib"],
        })  # fmt: skip
    return rows


def paged_kv_bytes(shape: LlmShape, tokens_by_layer: list[float], block: int) -> int:
    """Bytes a paged KV cache holds for one sequence with `tokens_by_layer[i]` tokens in layer i (blocks of
    `block` tokens)."""
    per_token = 2 * shape.kv_heads * shape.head_dim * shape.bytes_per_element
    return sum(-(-round(t) // block) * block * per_token for t in tokens_by_layer)


def dynamic_kv_projection(shape: LlmShape, sparse_layer: int, vision_keep_rate: float, output_kept: float,
                          new_tokens: int, block: int, image_tokens: int = 576,
                          text_tokens: int = LLAVA_TEXT_TOKENS) -> dict[str, float]:  # fmt: skip
    """Paged KV bytes of Dynamic-LLaVA against every token kept, for one LLaVA-1.5 sequence of `shape`:
    layers below `sparse_layer` hold every token; the others the image top-k, the text and the kept outputs."""
    fed = new_tokens - 1
    every = 1 + image_tokens + text_tokens + fed
    kept = 1 + max(1, int(image_tokens * vision_keep_rate)) + text_tokens + output_kept * fed
    layers = [every if i < sparse_layer else kept for i in range(shape.layers)]
    dense, dynamic = paged_kv_bytes(shape, [every] * shape.layers, block), paged_kv_bytes(shape, layers, block)
    return {"image_tokens": image_tokens, "text_tokens": text_tokens, "new_tokens": new_tokens,
            "output_kept": output_kept, "dense": dense, "dynamic": dynamic, "ratio": dynamic / dense}  # fmt: skip
