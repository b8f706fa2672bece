"""Drive prumerge's TensorRT plugins through TensorRT's own plugin package, playing TensorRT's part.

`install(wheel, root)` unpacks `tensorrt_bindings/plugin/` from a `tensorrt-cu12-bindings` wheel into
`root/tensorrt/plugin/` beside `tests/tensorrt_core_standin.py` as `root/tensorrt/__init__.py`. Run as a script
with `root` first on PYTHONPATH, this module registers the plugins (`register_plugins()`), then for each case does
what TensorRT's ONNX parser and builder do: looks the creator up in the registry, creates the plugin from field
arrays as the parser passes them (one-element NumPy arrays of the creator's declared field types), asks for the
output types, the output shapes (symbolic: the batch is a symbol, other dimensions constants), the supported
format combinations (autotune), configures it, picks a tactic and, for AOT plugins, calls the launch-parameter
callback and evaluates grid, block, shared memory and scalars for a batch of BATCH. It prints one JSON report.
"""

from __future__ import annotations

import json
import shutil
import sys
import zipfile
from pathlib import Path

STANDIN = Path(__file__).with_name("tensorrt_core_standin.py")
PARSER_ONLY_ATTRIBUTES = {"plugin_namespace", "plugin_version", "aot"}  # read by the parser, not passed on
BATCH = 3


def install(wheel: Path, root: Path) -> str:
    """Unpack the wheel's plugin package under `root/tensorrt` with the stand-in core; returns its version."""
    package = root / "tensorrt"
    shutil.copy(STANDIN, root / "standin.py")
    (package / "plugin").mkdir(parents=True)
    version = wheel.name.split("-")[1]
    (package / "__init__.py").write_text(f"import os\nos.environ.setdefault('TRT_STANDIN_VERSION', {version!r})\n"
                                         "from standin import *\nfrom standin import __version__\n")  # fmt: skip
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.startswith("tensorrt_bindings/plugin/") and name.endswith(".py"):
                (package / "plugin" / Path(name).name).write_bytes(archive.read(name))
    return version


def main() -> None:
    import numpy as np
    import tensorrt as trt

    from prumerge_cli.plugins import attention_ops, onnx_ops
    from prumerge_cli.plugins.trt_plugins import register_plugins

    register_plugins()
    registry = trt.get_plugin_registry()
    half, single = trt.DataType.HALF, trt.DataType.FLOAT
    select_inputs = [(half, ("batch", 64, 32)), (half, ("batch", 64)), (half, ("batch", 64, 32))]
    attention_inputs = [(half, ("batch", 4, 1, 64)), (half, ("batch", 2, 40, 64)), (half, ("batch", 2, 40, 64)),
                        (trt.DataType.INT32, ("batch",)), (trt.DataType.INT8, ("batch", 40))]  # fmt: skip
    select_attrs = {"plus": 0, "iqr_k": 1.5, "knn": 8, "grid_div": 3}
    fp32_select = [(single, shape) for _, shape in select_inputs]
    cases = {
        "AdaptiveTokenSelect jit": ("AdaptiveTokenSelect", select_attrs, select_inputs, "PREFER_JIT"),
        "AdaptiveTokenSelect aot": ("AdaptiveTokenSelect", select_attrs, select_inputs, "PREFER_AOT"),
        "AdaptiveTokenSelect+ aot fp32": (
            "AdaptiveTokenSelect",
            {**select_attrs, "plus": 1},
            fp32_select,
            "PREFER_AOT",
        ),
        "AdaptiveTokenSelectCount jit": ("AdaptiveTokenSelectCount", select_attrs, select_inputs, "PREFER_JIT"),
        "SparseKVAttention jit": ("SparseKVAttention", {"causal": 1}, attention_inputs, "PREFER_JIT"),
        "SparseKVAttention aot": ("SparseKVAttention", {"causal": 1}, attention_inputs, "PREFER_AOT"),
    }
    onnx_attributes = {"AdaptiveTokenSelect": set(onnx_ops.ATTRIBUTES) - PARSER_ONLY_ATTRIBUTES,
                       "AdaptiveTokenSelectCount": set(onnx_ops.ATTRIBUTES) - PARSER_ONLY_ATTRIBUTES,
                       "SparseKVAttention": set(attention_ops.ATTRIBUTES) - PARSER_ONLY_ATTRIBUTES}  # fmt: skip
    report = {"version": trt.__version__, "registered": sorted(name for name, _, _ in registry.creators), "cases": {}}
    for key, (name, attrs, inputs, request) in cases.items():
        creator = registry.get_creator(name, "1", "prumerge")
        declared = {field.name: field.type for field in creator.field_names}
        assert set(declared) == onnx_attributes[name] == set(attrs), (name, declared)
        fields = trt.PluginFieldCollection(
            trt.PluginField(n, np.array([v], dtype=trt.FIELD_NUMPY_TYPES[declared[n]]), declared[n])
            for n, v in attrs.items()
        )
        plugin = creator.create_plugin(name, "prumerge", fields, trt.TensorRTPhase.BUILD,
                                       getattr(trt.QuickPluginCreationRequest, request))  # fmt: skip
        report["cases"][key] = drive(trt, plugin, inputs)
    json.dump(report, sys.stdout)


def drive(trt, plugin, inputs) -> dict:
    """Types, symbolic shapes, format combinations, tactics and (AOT) launch parameters of one plugin."""
    is_aot = isinstance(plugin, trt.IPluginV3QuickAOTBuild)
    types = plugin.get_output_data_types([t for t, _ in inputs], [len(shape) for _, shape in inputs])
    builder = trt.IExprBuilder()
    in_exprs = [trt.DimsExprs(dimension(trt, builder, d) for d in shape) for _, shape in inputs]
    out_exprs = plugin.get_output_shapes(in_exprs, [], builder)
    symbols = {"batch": BATCH, **{f"size_tensor{i}": -1 for i in range(8)}}
    shapes = [[e.evaluate(symbols) for e in exprs] for exprs in out_exprs]
    size_tensors = {i: [e.evaluate(symbols) for e in bounds] for i, bounds in builder.size_tensors.items()}
    concrete = [tuple(BATCH if d == "batch" else d for d in shape) for _, shape in inputs]
    out_dims = [tuple(max(d, 1) for d in shape) for shape in shapes]
    in_out = [desc(trt, dims, t) for (t, _), dims in zip(inputs, concrete, strict=True)]
    in_out += [desc(trt, dims, t) for dims, t in zip(out_dims, types, strict=True)]
    combos = plugin.get_supported_format_combinations(in_out, len(inputs))
    plugin.configure_plugin(in_out[: len(inputs)], in_out[len(inputs) :])
    tactics = plugin.get_valid_tactics()
    plugin.set_tactic(tactics[0] if tactics else 0)
    result = {"kind": "aot" if is_aot else "jit", "types": [t.name for t in types], "shapes": shapes,
              "size_tensors": size_tensors, "combinations": len(combos) // len(in_out),
              "tactics": list(tactics)}  # fmt: skip
    if is_aot:
        launch, setter = trt.KernelLaunchParams(), trt.SymExprSetter()
        plugin.get_launch_params(in_exprs, in_out, len(inputs), launch, setter, builder)
        value = lambda v: getattr(v, "expr", v).evaluate(symbols)  # noqa: E731
        result["grid"] = [value(launch.grid_x), value(launch.grid_y), value(launch.grid_z)]
        result["block"] = [value(launch.block_x), value(launch.block_y), value(launch.block_z)]
        result["shared_mem"] = value(launch.shared_mem)
        result["scalars"] = [value(setter.items[i]) for i in range(setter.nbSymExprs)]
        name, ptx = plugin.get_kernel([d.desc for d in in_out[: len(inputs)]], [d.desc for d in in_out[len(inputs) :]])
        result["kernel"] = name
        result["ptx_entry"] = f".entry {name}".encode() in ptx
    return result


def dimension(trt, builder, d):
    """A runtime dimension ("batch") as a symbol, anything else as a build-time constant."""
    return trt.IDimensionExpr(symbol=d) if isinstance(d, str) else builder.constant(d)


def desc(trt, dims, dtype):
    """A DynamicPluginTensorDesc with the same min / opt / max dimensions."""
    return trt.DynamicPluginTensorDesc(trt.PluginTensorDesc(dims, dtype), dims, dims, dims)


if __name__ == "__main__":
    main()
