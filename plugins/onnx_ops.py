"""The plugin graph: PruMerge selection and merge as ONE custom ONNX node that TensorRT's ONNX parser maps
to the `prumerge::AdaptiveTokenSelect` plugin (op type = plugin name, `plugin_namespace`, `plugin_version`).

- an ONNX schema for the node, so onnxscript can emit it and `onnx.checker` validates it;
- a torch custom op whose CPU implementation is the reducer itself (export mode, static Kmax) and whose
  fake implementation gives the static shapes, translated to the node by onnxscript;
- an onnxruntime-extensions Python op that runs the node in ONNX Runtime with the same reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxscript
import torch
from onnx.defs import OpSchema

from ..reducers import TowerSignals, build_reducer

DOMAIN = "prumerge"
OP_TYPE = "AdaptiveTokenSelect"
VERSION = "1"
ORT_CONTRIB_DOMAIN = "ai.onnx.contrib"
ATTRIBUTES = {"plus": OpSchema.AttrType.INT, "iqr_k": OpSchema.AttrType.FLOAT, "knn": OpSchema.AttrType.INT,
              "grid_div": OpSchema.AttrType.INT, "plugin_namespace": OpSchema.AttrType.STRING,
              "plugin_version": OpSchema.AttrType.STRING, "aot": OpSchema.AttrType.INT}  # fmt: skip


def register_node_schema(op_type: str, doc: str, inputs: list[tuple[str, str]], outputs: list[tuple[str, str]],
                         attributes: dict[str, OpSchema.AttrType]) -> None:  # fmt: skip
    """Register a plugin node's schema in our domain with onnx (once per process); "T" is fp32 or fp16."""
    if onnx.defs.has(op_type, DOMAIN):
        return
    param = OpSchema.FormalParameter
    onnx.defs.register_schema(OpSchema(
        op_type, DOMAIN, int(VERSION), doc=doc,
        inputs=[param(name, kind) for name, kind in inputs], outputs=[param(name, kind) for name, kind in outputs],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "floating-point tensors")],
        attributes=[OpSchema.Attribute(name, kind, name) for name, kind in attributes.items()],
    ))  # fmt: skip


def register_schema() -> None:
    """Register the AdaptiveTokenSelect node's schema."""
    register_node_schema(
        OP_TYPE, "PruMerge / PruMerge+ token selection and merge, padded to Kmax, with per-image lengths.",
        [("features", "T"), ("scores", "T"), ("keys", "T")],
        [("tokens", "T"), ("lengths", "tensor(int64)"), ("indices", "tensor(int64)")], ATTRIBUTES,
    )  # fmt: skip


def reference(features, scores, keys, plus: int, iqr_k: float, knn: int, grid_div: int):
    """The node's semantics: the `prumerge` / `prumerge+` reducer in export mode (static Kmax)."""
    method = "prumerge+" if plus else "prumerge"
    params: dict[str, Any] = {"iqr_k": iqr_k, "knn": knn, **({"grid_div": grid_div} if plus else {})}
    n = features.shape[1]
    reducer = build_reducer(method, **params).for_export(n)
    out = reducer.reduce(TowerSignals(features, scores, keys, (n, 1)))
    return out.tokens, out.lengths, out.indices


def kmax(n: int, plus: int) -> int:
    """The padded output width for `n` patches."""
    return build_reducer("prumerge+" if plus else "prumerge").for_export(n).max_tokens(n)


@torch.library.custom_op("prumerge::adaptive_token_select", mutates_args=())
def adaptive_token_select(
    features: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, plus: int, iqr_k: float, knn: int, grid_div: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch custom op for export; runs the reference."""
    tokens, lengths, indices = reference(features, scores, keys, plus, iqr_k, knn, grid_div)
    return tokens.contiguous(), lengths.contiguous(), indices.contiguous()


@adaptive_token_select.register_fake
def _(features, scores, keys, plus, iqr_k, knn, grid_div):
    batch, n, width = features.shape
    k = kmax(n, plus)
    return (features.new_empty(batch, k, width), features.new_empty(batch, dtype=torch.int64),
            features.new_empty(batch, k, dtype=torch.int64))  # fmt: skip


_OPSET = onnxscript.values.Opset(DOMAIN, int(VERSION))


def translation(aot: bool):
    """The onnxscript translation; `aot` asks TensorRT for the ahead-of-time implementation."""

    def _translate(features, scores, keys, plus: int, iqr_k: float, knn: int, grid_div: int):
        register_schema()
        return _OPSET.AdaptiveTokenSelect(features, scores, keys, plus=plus, iqr_k=iqr_k, knn=knn, grid_div=grid_div,
                                          plugin_namespace=DOMAIN, plugin_version=VERSION, aot=int(aot))  # fmt: skip

    return _translate


def translation_table(aot: bool = False) -> dict:
    """For `torch.onnx.export(custom_translation_table=...)`."""
    register_schema()
    return {torch.ops.prumerge.adaptive_token_select.default: translation(aot)}


_PYOP_REGISTERED = False


def register_ort_pyop() -> str:
    """Register the reference as an onnxruntime-extensions Python op; returns the extensions library path."""
    global _PYOP_REGISTERED
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    if not _PYOP_REGISTERED:
        attrs = {"plus": PyCustomOpDef.dt_int64, "iqr_k": PyCustomOpDef.dt_float, "knn": PyCustomOpDef.dt_int64,
                 "grid_div": PyCustomOpDef.dt_int64, "plugin_namespace": PyCustomOpDef.dt_string,
                 "plugin_version": PyCustomOpDef.dt_string, "aot": PyCustomOpDef.dt_int64}  # fmt: skip

        outputs = [PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64, PyCustomOpDef.dt_int64]

        @onnx_op(op_type=OP_TYPE, inputs=[PyCustomOpDef.dt_float] * 3, outputs=outputs, attrs=attrs)
        def _run(features, scores, keys, plus=0, iqr_k=1.5, knn=32, grid_div=3, **_names):
            out = reference(
                *(torch.from_numpy(np.asarray(a)) for a in (features, scores, keys)), plus, iqr_k, knn, grid_div
            )
            return tuple(t.numpy() for t in out)

        _PYOP_REGISTERED = True
    return get_library_path()


def ort_model_with_pyops(model_path: Path, out_dir: Path) -> Path:
    """A copy of the model, in `out_dir`, whose plugin nodes sit in the domain onnxruntime-extensions serves."""
    model = onnx.load(str(model_path))
    for node in model.graph.node:
        if node.domain == DOMAIN:
            node.domain = ORT_CONTRIB_DOMAIN
    imports = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend([*imports, onnx.helper.make_opsetid(ORT_CONTRIB_DOMAIN, 1)])
    out = out_dir / "model.onnx"
    onnx.save(model, str(out))
    return out
