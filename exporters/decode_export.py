"""Export one sparse-KV decode step of a model with learned predictors (a dynamic bundle) to ONNX: static
key/value buffers in and out, per-sample counters, the output predictor's keep decision, commit-or-overwrite.

The attention over the cache is either ONNX `Attention` (opset 23) under a boolean mask (plugin-free) or one
`prumerge::SparseKVAttention` node per layer (`plugins=True`) that TensorRT maps to the plugin."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from .. import atomic
from ..dynamic.attention import dynamic_attention_on
from ..dynamic.cache import SparseKVCache
from ..dynamic.model import DynamicLlava
from ..dynamic.predictors import keep_decision
from ..errors import PrumergeError
from ..lm.splice import splice
from ..models.weights import hash_files
from ..versions import package_versions
from .onnx_export import exporting

ATTENTION = "prumerge_decode_export"
FORMAT = "prumerge-onnx-decode"
MANIFEST = "manifest.json"


def export_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                     kv_lengths: torch.Tensor | None = None, plugin: bool = False, **kwargs: object):  # fmt: skip
    """Attention of one new token over static buffers whose first `kv_lengths[b]` slots are valid."""
    if plugin:
        keep = torch.ones(key.shape[0], key.shape[2], dtype=torch.int8)
        out = torch.ops.prumerge.sparse_kv_attention(query, key, value, kv_lengths.to(torch.int32), keep, 0)
    else:
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        mask = (torch.arange(key.shape[2])[None, :] < kv_lengths[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, export_attention)


class BufferWrites:
    """The cache interface `LlamaAttention` calls, functional: writes the new K/V at each group's counter
    into copies of the static buffers and keeps the results as the step's outputs."""

    def __init__(self, buffers: list[torch.Tensor], dense: torch.Tensor, sparse: torch.Tensor, sparse_layer: int):
        self.buffers = list(buffers)
        self.dense, self.sparse, self.sparse_layer = dense, sparse, sparse_layer

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, ...]:
        counter = self.dense if layer_idx < self.sparse_layer else self.sparse
        b, h, _, d = key.shape
        index = counter[:, None, None, None].expand(b, h, 1, d)
        for offset, new in enumerate((key, value)):
            slot = 2 * layer_idx + offset
            self.buffers[slot] = self.buffers[slot].scatter(2, index, new.to(self.buffers[slot].dtype))
        return self.buffers[2 * layer_idx], self.buffers[2 * layer_idx + 1]


class DecodeStep(nn.Module):
    """(embeds [B, 1, H], dense [B], sparse [B], k0, v0, k1, v1, ...) -> (logits [B, V], keep [B], dense + 1,
    sparse + keep, updated buffers). Positions are `dense` (absolute); the predictor decides `keep`."""

    def __init__(self, dynamic: DynamicLlava, plugin: bool):
        super().__init__()
        self.dynamic = dynamic
        self.decoder = dynamic.decoder
        self.head = dynamic.lm.model.lm_head
        self.predictors = dynamic.predictors
        self.plugin = plugin

    def forward(self, embeds: torch.Tensor, dense: torch.Tensor, sparse: torch.Tensor, *buffers: torch.Tensor):
        layer_l = self.dynamic.layer
        writes = BufferWrites(list(buffers), dense, sparse, layer_l)
        rotary = self.decoder.rotary_emb(embeds, dense[:, None])
        h, keep = embeds, torch.ones_like(dense, dtype=torch.bool)
        for i, layer in enumerate(self.decoder.layers):
            if i == layer_l and self.dynamic.output:
                keep = keep_decision(self.predictors.text(h))[:, 0]
            lengths = (dense if i < layer_l else sparse) + 1
            h = layer(h, attention_mask=None, position_embeddings=rotary, past_key_values=writes, kv_lengths=lengths,
                      plugin=self.plugin)  # fmt: skip
        logits = self.head(self.decoder.norm(h))[:, 0]
        return (logits, keep, dense + 1, sparse + keep.to(sparse.dtype), *writes.buffers)


@dataclass(frozen=True)
class DecodeOptions:
    """Batch, prompt length the buffers are sized for, new tokens they leave room for, plugins and AOT."""

    batch: int = 1
    prompt_tokens: int = 320
    new_tokens: int = 64
    plugins: bool = False
    aot: bool = False
    check: bool = True


def buffer_sizes(dynamic: DynamicLlava, options: DecodeOptions, image_tokens: int) -> tuple[int, int]:
    """Slots of the dense and the sparse buffers: prompt plus new tokens, minus dropped image tokens."""
    total = options.prompt_tokens + options.new_tokens
    return total, total - dynamic.dropped_image_tokens(image_tokens)


def sample_state(dynamic: DynamicLlava, image, options: DecodeOptions) -> tuple[SparseKVCache, torch.Tensor]:
    """A real cache state to export with and check on: a prefill of `image` with a short prompt."""
    text = dynamic.lm.encode(["describe the image ."])[0]
    batch = splice(dynamic.lm.embed, dynamic.lm.bos_id, image, [text] * len(image.lengths))
    dense_slots, sparse_slots = buffer_sizes(dynamic, options, int(image.lengths.max()))
    cache = dynamic.empty_cache(len(image.lengths), dense_slots, sparse_slots, torch.float32)
    with torch.no_grad():
        token = dynamic.prefill(batch, image.lengths, cache).logits.argmax(-1)
    return cache, token


def step_inputs(dynamic: DynamicLlava, cache: SparseKVCache, token: torch.Tensor) -> list[torch.Tensor]:
    """The decode graph's inputs for feeding `token` at the cache's state."""
    buffers = [t for pair in zip(cache.keys, cache.values, strict=True) for t in pair]
    with torch.no_grad():
        embeds = dynamic.lm.embed(token)[:, None]
    return [embeds, cache.dense.clone(), cache.sparse.clone(), *(b.clone() for b in buffers)]


def names(layers: int) -> tuple[list[str], list[str]]:
    """Input and output names."""
    kv = [f"{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    return ["embeds", "dense_len", "sparse_len", *kv], ["logits", "keep", "dense_len_out", "sparse_len_out",
                                                        *(f"{n}_out" for n in kv)]  # fmt: skip


def export_decode_step(dynamic: DynamicLlava, image, out_dir: Path, options: DecodeOptions, force: bool = False,
                       source: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Export, check against the eager decode step (unless disabled) and write `out_dir`; returns the manifest."""
    if options.batch != len(image.lengths):
        raise PrumergeError("the sample image batch must match --batch")
    cache, token = sample_state(dynamic, image, options)
    inputs = step_inputs(dynamic, cache, token)
    module = DecodeStep(dynamic, options.plugins).eval()
    table = None
    if options.plugins:
        from ..plugins.attention_ops import translation_table

        table = translation_table(options.aot)
    input_names, output_names = names(len(dynamic.decoder.layers))
    with atomic.atomic_dir(out_dir, force=force) as tmp:
        start = time.perf_counter()
        with exporting(), dynamic_attention_on(dynamic.decoder.config, ATTENTION), torch.no_grad():
            program = torch.onnx.export(
                module, tuple(inputs), dynamo=True, opset_version=23, input_names=input_names,
                output_names=output_names, verbose=False, custom_translation_table=table,
            )  # fmt: skip
        program.save(str(tmp / "model.onnx"))
        seconds = time.perf_counter() - start
        parity = check_decode_parity(dynamic, tmp / "model.onnx", cache, token, options) if options.check else None
        manifest = decode_manifest(dynamic, options, inputs, input_names, output_names, tmp, seconds, parity, source)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def check_decode_parity(dynamic: DynamicLlava, model_path: Path, cache: SparseKVCache, token: torch.Tensor,
                        options: DecodeOptions, steps: int = 4) -> dict[str, Any]:  # fmt: skip
    """Feed `steps` tokens through ONNX Runtime (its buffers fed back) and through the eager decode step:
    keep decisions and counters equal, logits within 1e-4 x max(1, |logits|)."""
    from ..runtime.ort import create_session

    session = create_session(model_path, threads=None, plugins=options.plugins)
    input_names, output_names = names(len(dynamic.decoder.layers))
    feed = [t.numpy() for t in step_inputs(dynamic, cache, token)]
    worst, decisions_equal = 0.0, True
    for _ in range(steps):
        got = session.run(output_names, dict(zip(input_names, feed, strict=True)))
        with torch.no_grad():
            logits, keep = dynamic.decode_step(token, cache)
        scale = max(1.0, float(logits.abs().max()))
        worst = max(worst, float(np.abs(got[0] - logits.numpy()).max()) / scale)
        decisions_equal &= np.array_equal(got[1], keep.numpy()) and np.array_equal(got[2], cache.dense.numpy())
        decisions_equal &= np.array_equal(got[3], cache.sparse.numpy())
        token = logits.argmax(-1)
        with torch.no_grad():
            feed = [dynamic.lm.embed(token)[:, None].numpy(), got[2], got[3], *got[4:]]
    report = {"steps": steps, "decisions_and_counters_equal": bool(decisions_equal), "logits_max_rel": worst,
              "tolerance": "keep and counters equal, logits max abs 1e-4 x max(1, |logits|)"}  # fmt: skip
    report["passed"] = report["decisions_and_counters_equal"] and worst <= 1e-4
    if not report["passed"]:
        raise PrumergeError(f"ONNX Runtime disagrees with PyTorch: {json.dumps(report)} (--no-check skips this)")
    return report


def decode_manifest(dynamic: DynamicLlava, options: DecodeOptions, inputs: list[torch.Tensor], input_names: list[str],
                    output_names: list[str], out_dir: Path, seconds: float, parity: dict[str, Any] | None,
                    source: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    """What a runtime or a reader needs: shapes, the two buffer groups, the attention form, parity, files."""
    from ..plugins.attention_ops import OP_TYPE
    from ..plugins.onnx_ops import DOMAIN, VERSION

    files = sorted(p for p in out_dir.iterdir() if p.is_file() and p.name != MANIFEST)
    plugins = [{"op_type": OP_TYPE, "domain": DOMAIN, "plugin_namespace": DOMAIN, "plugin_version": VERSION,
                "tensorrt_plugin": f"{DOMAIN}::{OP_TYPE}", "implementation": "aot" if options.aot else "jit",
                "count": len(dynamic.decoder.layers),
                "onnxruntime": "onnxruntime-extensions Python op (reference)"}] if options.plugins else []  # fmt: skip
    return {
        "format": FORMAT, "format_version": 1, "graph": "sparse-KV decode step",
        "versions": package_versions("onnx", "onnxruntime", "onnxscript"), "opset": 23, "dtype": "fp32",
        "inputs": [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                   for n, t in zip(input_names, inputs, strict=True)],
        "outputs": output_names,
        "sparse_layer": dynamic.layer,
        "buffers": {"dense_slots": inputs[3].shape[2], "sparse_slots": inputs[-1].shape[2]},
        "attention": "prumerge::SparseKVAttention plugin nodes" if options.plugins
        else "ONNX Attention (opset 23), bool mask",
        "plugins": plugins, "source": source or {}, "export_seconds": round(seconds, 2), "parity": parity,
        "files": {p.name: {"sha256": hash_files([p]), "bytes": p.stat().st_size} for p in files},
    }  # fmt: skip
