"""Dynamic-LLaVA predictors on a real (tiny) LlavaForConditionalGeneration: the spec's equivalences."""

from __future__ import annotations

import pytest
import torch

from prumerge_cli.dynamic import DynamicLlava, Predictors, SparseConfig
from prumerge_cli.dynamic.compaction import compact
from prumerge_cli.encoder import ReducedVisionEncoder
from prumerge_cli.lm.llava_lm import LlavaLm
from prumerge_cli.lm.splice import splice
from prumerge_cli.reducers import ReducedTokens

SMALL = dict(d_model=32, nhead=4, dim_feedforward=64, num_layers=1, text_hidden=(32, 16, 8))


@pytest.fixture(scope="module")
def lm(llava_deep_dir):
    return LlavaLm.from_pretrained(llava_deep_dir)


@pytest.fixture(scope="module")
def image(llava_deep_dir, image_paths):
    """Projected tokens of three images (all 64 patches)."""
    from prumerge_cli.models.images import open_image

    encoder = ReducedVisionEncoder.from_pretrained(llava_deep_dir, "none")
    return encoder.encode_images([open_image(p) for p in image_paths[:3]], project=True)


def mixed_predictors(hidden: int, vision_keep_rate: float = 0.25, seed: int = 1) -> Predictors:
    """Predictors whose output decisions vary from token to token (a trained predictor's, not an init's): with
    seed 1 they keep 6 of the 27 tokens generated for `prompts` (seed 0 keeps all 27)."""
    predictors = Predictors(hidden, SparseConfig(vision_keep_rate=vision_keep_rate, **SMALL), seed=seed)
    last = predictors.text.mlp[-1]
    with torch.no_grad():
        last.weight.normal_(0, 3.0, generator=torch.Generator().manual_seed(seed))
        last.bias.zero_()
    return predictors.eval()


def prompts(lm: LlavaLm) -> list[list[int]]:
    return lm.encode(["what color is the object at northwest", "how many objects are there", "is there a red cross"])


def row(image: ReducedTokens, b: int) -> ReducedTokens:
    return ReducedTokens(image.tokens[b : b + 1], image.lengths[b : b + 1], image.indices[b : b + 1])


def test_keep_all_equals_dense(lm, image):
    dynamic = DynamicLlava(lm.model, lm.tokenizer, mixed_predictors(32, vision_keep_rate=1.0), output=False)
    batch = splice(lm.embed, lm.bos_id, image, prompts(lm))
    torch.testing.assert_close(dynamic.prefill(batch, image.lengths).logits, lm.next_token_logits(batch),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    generated = dynamic.generate(image, prompts(lm), 6)
    dense = lm.greedy(batch, 6)
    assert generated.texts(lm.eos_id) == dense


def test_masked_form_equals_compacted_on_kept_tokens(lm, image):
    dynamic = DynamicLlava(lm.model, lm.tokenizer, mixed_predictors(32))
    batch = splice(lm.embed, lm.bos_id, image, prompts(lm))
    keep = batch.attention_mask.bool() & dynamic.prefill(batch, image.lengths).keep
    keep[:, 70:73] = False  # drop some prompt text too; the last token stays
    masked = dynamic.masked_hidden(batch, keep)
    compacted, index, valid = dynamic.compacted_hidden(batch, keep)
    for b in range(len(keep)):
        n = int(valid[b].sum())
        torch.testing.assert_close(compacted[b, :n], masked[b, index[b, :n]], rtol=1e-4, atol=1e-5)
    assert int(keep[0, 1:65].sum()) == 16  # k = floor(0.25 * 64) image tokens


def test_cache_and_no_cache_make_the_same_decisions(lm, image):
    dynamic = DynamicLlava(lm.model, lm.tokenizer, mixed_predictors(32))
    cached = dynamic.generate(image, prompts(lm), 10, use_cache=True)
    uncached = dynamic.generate(image, prompts(lm), 10, use_cache=False)
    assert cached.tokens.tolist() == uncached.tokens.tolist()
    assert cached.kept.tolist() == uncached.kept.tolist()
    assert 0 < int(cached.kept.sum()) < cached.kept.numel()  # some generated tokens really are dropped
    assert cached.dense.tolist() == uncached.dense.tolist() and cached.sparse.tolist() == uncached.sparse.tolist()


def test_cache_lengths(lm, image):
    dynamic = DynamicLlava(lm.model, lm.tokenizer, mixed_predictors(32))
    texts = prompts(lm)
    out = dynamic.generate(image, texts, 8)
    prompt = torch.tensor([1 + 64 + len(t) for t in texts])
    assert out.dense.tolist() == (prompt + 7).tolist()  # every fed token, dense layers
    assert out.sparse.tolist() == (prompt - (64 - 16) + out.kept.sum(1)).tolist()
    dense_bytes = dynamic.kv_bytes(out.dense, out.dense)
    assert dynamic.kv_bytes(out.dense, out.sparse) < dense_bytes


def test_paged_cache_holds_what_is_kept(lm, image):
    """The allocated bytes are the stored tokens rounded up to a block per sample and layer: fewer kept
    output tokens, less memory (a static buffer would allocate prompt + max_new for every row)."""
    from prumerge_cli.dynamic.cache import BLOCK_TOKENS

    texts = prompts(lm)
    per_token = 2 * lm.model.config.text_config.num_key_value_heads * 16 * 4  # K and V, fp32, head dim 16
    outs = {}
    for seed in (0, 1):  # seed 0 keeps every generated token, seed 1 drops most
        dynamic = DynamicLlava(lm.model, lm.tokenizer, mixed_predictors(32, seed=seed))
        out = outs[seed] = dynamic.generate(image, texts, 40)
        stored = dynamic.kv_bytes(out.dense, out.sparse, torch.float32)
        slack = len(texts) * len(dynamic.decoder.layers) * (BLOCK_TOKENS - 1) * per_token
        assert stored <= out.allocated_bytes <= stored + slack
    assert outs[1].kept.sum() < outs[0].kept.sum() - 30
    assert outs[1].allocated_bytes < outs[0].allocated_bytes


def test_dropped_token_slot_is_overwritten(lm, image):
    dynamic = DynamicLlava(lm.model, lm.tokenizer, mixed_predictors(32))
    one = row(image, 0)
    batch = splice(lm.embed, lm.bos_id, one, prompts(lm)[:1])
    cache = dynamic.new_cache(batch)
    token = dynamic.prefill(batch, one.lengths, cache).logits.argmax(-1)
    seen_drop = False
    for _ in range(15):
        slot = int(cache.sparse[0])
        logits, keep = dynamic.decode_step(token, cache)
        written = cache.key_at(2, 0, slot).clone()
        token = logits.argmax(-1)
        if not bool(keep[0]):
            seen_drop = True
            assert int(cache.sparse[0]) == slot  # not committed
            dynamic.decode_step(token, cache)
            assert not torch.equal(cache.key_at(2, 0, slot), written)  # the next token took the slot
            break
        assert int(cache.sparse[0]) == slot + 1
    assert seen_drop


def test_batch_equals_samples_one_by_one(lm, image):
    dynamic = DynamicLlava(lm.model, lm.tokenizer, mixed_predictors(32))
    texts = prompts(lm)
    batched = dynamic.generate(image, texts, 8)
    for b in range(3):
        alone = dynamic.generate(row(image, b), texts[b : b + 1], 8)
        assert alone.tokens.tolist() == batched.tokens[b : b + 1].tolist()
        assert alone.kept.tolist() == batched.kept[b : b + 1].tolist()
        assert alone.sparse.tolist() == batched.sparse[b : b + 1].tolist()


def test_rope_positions_stay_absolute(lm, image):
    """The last decode step's logits equal the masked form over the whole sequence at original positions."""
    dynamic = DynamicLlava(lm.model, lm.tokenizer, mixed_predictors(32))
    one, text = row(image, 1), prompts(lm)[1]
    batch = splice(lm.embed, lm.bos_id, one, [text])
    cache = dynamic.new_cache(batch)
    prefill = dynamic.prefill(batch, one.lengths, cache)
    fed, kept = [], []
    token = prefill.logits.argmax(-1)
    for _ in range(10):
        fed.append(int(token))
        logits, keep = dynamic.decode_step(token, cache)
        kept.append(bool(keep))
        token = logits.argmax(-1)
    assert int(cache.dense[0]) == batch.inputs_embeds.shape[1] + 10  # absolute position of the next token
    assert int(cache.sparse[0]) == int(cache.dense[0]) - (64 - 16) - kept.count(False)  # slots < positions
    full = splice(lm.embed, lm.bos_id, one, [text + fed])
    policy = torch.cat([prefill.keep[0], torch.tensor(kept)])[None]
    hidden = dynamic.masked_hidden(full, policy)
    torch.testing.assert_close(lm.model.lm_head(hidden[:, -1]), logits, rtol=1e-4, atol=1e-4)


def test_compact_keeps_order_and_pads():
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    index, valid = compact(keep)
    assert index.tolist() == [[0, 2, 3], [1, 0, 0]] and valid.tolist() == [[True] * 3, [True, False, False]]


@pytest.mark.parametrize("chunk", [5, 64])
def test_chunked_masked_softmax_equals_the_materialised_one(chunk):
    """Outputs and gradients (q, k, v and the policy, whose straight-through gradient trains the predictors) of
    the chunked form equal autograd through the `[B, H, T, T]` form, at fp64 precision."""
    from prumerge_cli.dynamic.attention import ChunkedPolicyAttention, causal_mask, policy_softmax

    torch.manual_seed(0)
    b, h, t, d = 2, 3, 37, 8
    q, k, v = (torch.randn(b, h, t, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, 30:] = False
    allowed = causal_mask(valid)
    policy = (torch.rand(b, t) > 0.5).double().requires_grad_(True)
    reference = policy_softmax((q @ k.transpose(-1, -2)) * 0.3, allowed, policy) @ v
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, policy)]
    chunked = ChunkedPolicyAttention.apply(*leaves[:3], leaves[3], allowed, 0.3, chunk)
    torch.testing.assert_close(chunked, reference, rtol=0, atol=1e-12)
    weights = torch.randn_like(reference)
    (reference * weights).sum().backward()
    (chunked * weights).sum().backward()
    for original, ours in zip((q, k, v, policy), leaves, strict=True):
        assert original.grad.abs().max() > 0.1
        torch.testing.assert_close(ours.grad, original.grad, rtol=0, atol=1e-12)


def test_a_template_prefix_before_the_image(lm, image):
    """With a chat template's tokens between `<s>` and the image (vicuna_v1), the top-k is taken over the image
    span only, and cached and uncached decoding still agree."""
    dynamic = DynamicLlava(lm.model, lm.tokenizer, mixed_predictors(32))
    prefix = lm.encode(["a chat between a human and an assistant ."])[0]
    texts = prompts(lm)
    batch = splice(lm.embed, lm.bos_id, image, texts, prefixes=[prefix] * 3)
    start = 1 + len(prefix)
    keep = dynamic.prefill(batch, image.lengths, image_start=start).keep
    dropped = (~keep & batch.attention_mask.bool()).nonzero()[:, 1]
    assert len(dropped) == 3 * (64 - 16) and bool(((dropped >= start) & (dropped < start + 64)).all())
    cached = dynamic.generate(image, texts, 8, prefix=prefix)
    uncached = dynamic.generate(image, texts, 8, use_cache=False, prefix=prefix)
    assert cached.tokens.tolist() == uncached.tokens.tolist() and cached.kept.tolist() == uncached.kept.tolist()
    assert cached.tokens.tolist() != dynamic.generate(image, texts, 8).tokens.tolist()  # the prefix is seen
