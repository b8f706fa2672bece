"""Training of the embedded LLaVA: the trained CLIP tower frozen, a 2-layer MLP projector and a small Llama
trained on the world's questions with all visual tokens, as LLaVA-1.5's instruction tuning."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import CLIPModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from ..encoder import project_tokens
from ..lm.llava_lm import LlavaLm
from ..lm.splice import IGNORE, splice
from ..models.tower import VisionTower
from ..reducers import PAD_INDEX, ReducedTokens
from .clip_training import image_processor
from .oracle import covered_area
from .precision import autocast
from .stage import TrainingRun, warmup_cosine
from .tokenizer import IMAGE_TOKEN
from .world import IMAGE_SIZE, QA, Sample, samples_of


def llava_config(clip: CLIPModel, tokenizer) -> LlavaConfig:
    """LLaVA-1.5 layout: feature layer -2, CLS dropped, gelu MLP projector; a 4-layer Llama of width 256."""
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)  # fmt: skip
    return LlavaConfig(vision_config=clip.config.vision_config.to_dict(), text_config=text.to_dict(),
                       image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu",
                       image_seq_length=(clip.config.vision_config.image_size // 14) ** 2)  # fmt: skip


def build_llava(clip: CLIPModel, tokenizer, seed: int) -> LlavaForConditionalGeneration:
    """A fresh LLaVA whose vision tower is the trained CLIP's, frozen."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(clip, tokenizer))
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    model.model.vision_tower.requires_grad_(False)
    return model


def qa_tokens(tokenizer, qa: QA) -> tuple[list[int], list[bool]]:
    """`question reply </s>` as ids, with the reply (steps and answer) and `</s>` marked as targets."""
    question = tokenizer(qa.question, add_special_tokens=False)["input_ids"]
    answer = [*tokenizer(qa.reply, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    return question + answer, [False] * len(question) + [True] * len(answer)


def conversation_batch(samples: list[Sample], processor, tokenizer):
    """Pixels of the samples and, per image, its training conversation (`Sample.lesson`):
    `q1 a1 </s> q2 a2 </s> ... describe the image . <caption> </s>`, with answers and `</s>` as targets."""
    pixels = processor(images=[s.image for s in samples], return_tensors="pt")["pixel_values"]
    texts, targets = [], []
    for sample in samples:
        text: list[int] = []
        target: list[bool] = []
        for qa in sample.lesson:
            ids, is_target = qa_tokens(tokenizer, qa)
            text += ids
            target += is_target
        texts.append(text)
        targets.append(target)
    return pixels, texts, targets


def token_subsets(
    features: torch.Tensor,
    share: float,
    generator: torch.Generator,
    cover: torch.Tensor | None = None,
    bias: float = 0.0,
    lean: float = 0.0,
) -> ReducedTokens:
    """Every patch of each image, except that with probability `share` an image keeps only a subset of 8..N/4 of
    its N patches, in raster order at their original positions (`span` N). The subset is drawn with weights
    `exp(b * cover)` (`cover` [B, N]: the share of each patch an object covers; `b` uniform in
    [lean - bias, lean + bias] per image), so that subsets range from mostly background through uniform to mostly
    (with a large `lean`, only) object patches; uniform without `cover`."""
    count, n = features.shape[:2]
    chosen = []
    for b in range(count):
        if float(torch.rand((), generator=generator)) < share:
            k = int(torch.randint(8, n // 4 + 1, (), generator=generator))
            tilt = lean + (2 * float(torch.rand((), generator=generator)) - 1) * bias
            weights = torch.ones(n) if cover is None else torch.exp(tilt * cover[b])
            chosen.append(torch.multinomial(weights, k, generator=generator).sort().values)
        else:
            chosen.append(torch.arange(n))
    lengths = torch.tensor([len(c) for c in chosen])
    indices = torch.nn.utils.rnn.pad_sequence(chosen, batch_first=True, padding_value=PAD_INDEX)
    tokens = features.gather(1, indices.clamp(min=0)[..., None].expand(-1, -1, features.shape[2]))
    tokens = tokens * (indices >= 0)[..., None].to(tokens.dtype)
    return ReducedTokens(tokens, lengths, indices, span=n)


def object_cover(samples: list[Sample], side: int) -> torch.Tensor:
    """[B, side*side]: the share of each patch the objects of each sample cover."""
    patch = IMAGE_SIZE // side
    return torch.stack([covered_area(s, side, patch) for s in samples]) / patch**2


def llava_run(
    model: LlavaForConditionalGeneration,
    tokenizer,
    steps: int,
    images_per_step: int,
    seed: int,
    lr: float = 1.5e-3,
    precision: str = "auto",
    subset_share: float = 0.0,
    subset_bias: float = 0.0,
    subset_lean: float = 0.0,
    first: int = 0,
) -> TrainingRun:
    """Training of projector and LM on the conversations of `images_per_step` fresh images per step
    (`precision`: see `precision.resolve`); a `subset_share` of the images show the LM a random subset of their
    tokens, tilted towards or away from the objects' patches (`token_subsets`: `subset_lean` +- `subset_bias`), so
    that it learns to answer from whichever tokens it is given. Step i trains on the images and subsets of step
    `first + i`, so that a run continuing another (`first` = its steps) sees fresh images."""
    torch.manual_seed(seed)
    processor = image_processor()
    tower = VisionTower(model.model.vision_tower, "clip", feature_layer=-2)
    lm = LlavaLm(model, tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = warmup_cosine(opt, steps)
    model.train()

    def step(i: int) -> float:
        i += first
        samples = samples_of("train", i * images_per_step, images_per_step)
        pixels, texts, targets = conversation_batch(samples, processor, tokenizer)
        with torch.no_grad():
            features = tower(pixels, with_scores=False).features
        cover = object_cover(samples, math.isqrt(features.shape[1])) if subset_bias else None
        generator = torch.Generator().manual_seed(seed * 1_000_003 + i)
        kept = token_subsets(features, subset_share, generator, cover, subset_bias, subset_lean)
        with autocast(precision):
            projected = project_tokens(model.model.multi_modal_projector, kept.tokens, kept.lengths)
            image = ReducedTokens(projected, kept.lengths, kept.indices, span=kept.span)
            batch = splice(lm.embed, lm.bos_id, image, texts, targets)
            logits = lm.logits(batch)
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        return loss.item()

    return TrainingRun(model, opt, sched, step, steps)
