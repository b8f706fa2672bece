"""prumerge's TensorRT plugins against TensorRT's own plugin package (`tensorrt.plugin`, pure Python, from the
`tensorrt-cu12-bindings` wheel of every supported minor version), over a stand-in for TensorRT's compiled core:
registration, creation from parser-style fields, output types and symbolic shapes, autotune and AOT launch
parameters (see tests/trt_plugin_harness.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from prumerge_cli.plugins.shapes import select_kmax

from .trt_plugin_harness import BATCH, install

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".venv" / "tensorrt-wheels"
LINES = (ROOT / "tests" / "tensorrt_versions.txt").read_text().splitlines()
VERSIONS = [line.strip() for line in LINES if line.strip() and not line.startswith("#")]


def run_harness(version: str, tmp_path: Path) -> dict:
    wheels = sorted(WHEELS.glob(f"tensorrt_cu12_bindings-{version}-*.whl"))
    if not wheels:
        pytest.fail(f"no tensorrt-cu12-bindings {version} wheel in {WHEELS}: run `make setup`")
    assert install(wheels[0], tmp_path) == version
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the AOT callbacks compile PTX
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    proc = subprocess.run([sys.executable, "-m", "tests.trt_plugin_harness"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def harnesses(tmp_path_factory) -> Iterator[dict[str, Future]]:
    """Every version's harness, run side by side (a process each, as many at once as there are cores); a version's
    test waits for its own result and fails with its own error."""
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    futures = {v: pool.submit(run_harness, v, tmp_path_factory.mktemp(f"trt-{v}")) for v in VERSIONS}
    yield futures
    pool.shutdown(wait=True)


@pytest.mark.parametrize("version", VERSIONS)
def test_plugins_register_create_shape_and_launch(version, harnesses):
    from prumerge_cli.plugins.kernels.token_select import NUM_WARPS

    report = harnesses[version].result()
    print(json.dumps(report, indent=1))
    assert report["version"] == version
    assert report["registered"] == ["AdaptiveTokenSelect", "AdaptiveTokenSelectCount", "SparseKVAttention"]
    cases = report["cases"]
    kmax, kmax_plus = select_kmax(64, plus=False), select_kmax(64, plus=True)
    for key in ("AdaptiveTokenSelect jit", "AdaptiveTokenSelect aot"):
        case = cases[key]
        assert case["kind"] == key.split()[1]
        assert case["types"] == ["HALF", "INT64", "INT64"]
        assert case["shapes"] == [[BATCH, kmax, 32], [BATCH], [BATCH, kmax]]
    aot = cases["AdaptiveTokenSelect aot"]
    assert aot["grid"] == [BATCH, 1, 1] and aot["block"] == [NUM_WARPS * 32, 1, 1] and aot["ptx_entry"]
    assert aot["scalars"] == [64, 32, kmax, 63]  # N, C, Kmax, grid end
    plus = cases["AdaptiveTokenSelect+ aot fp32"]
    assert plus["types"] == ["FLOAT", "INT64", "INT64"] and plus["shapes"][0] == [BATCH, kmax_plus, 32]
    assert plus["scalars"] == [64, 32, kmax_plus, 63]
    count = cases["AdaptiveTokenSelectCount jit"]  # rows of all images packed; the count is a size tensor
    assert count["types"] == ["HALF", "INT64", "INT64", "INT32"]
    assert count["shapes"][2:] == [[BATCH], []] and count["shapes"][0][1] == 32
    assert count["size_tensors"] == {"3": [BATCH * (64 // 4), BATCH * kmax]}
    for key in ("SparseKVAttention jit", "SparseKVAttention aot"):
        case = cases[key]
        assert case["shapes"] == [[BATCH, 4, 1, 64]] and case["types"] == ["HALF"]
        assert case["combinations"] == 2  # q, k, v and the output all FP32 or all FP16
    attention = cases["SparseKVAttention aot"]
    assert attention["grid"] == [BATCH * 2, 1, 1] and attention["block"] == [128, 1, 1]
    assert attention["scalars"] == [4, 2, 1, 40, 64]  # H, GROUPS, TQ, TK, D


def test_a_tensorrt_outside_the_supported_range_is_refused_in_one_line():
    from prumerge_cli.errors import PrumergeError
    from prumerge_cli.exporters.trt_support import check_tensorrt_version

    for version in ("10.6.0", "10.8.0.43", "12.0.1"):
        with pytest.raises(PrumergeError, match=rf"TensorRT {version} is installed; .* >= 10.9, < 12"):
            check_tensorrt_version(version)
    for version in ("10.9.0.34", "11.4.0.106"):
        check_tensorrt_version(version)


def test_registration_refuses_an_unsupported_tensorrt_before_registering_anything(tmp_path):
    """A TensorRT older than 10.9 (no AOT plugin API) gets one line naming its version, and no plugin is left
    half-registered."""
    wheels = sorted(WHEELS.glob(f"tensorrt_cu12_bindings-{VERSIONS[0]}-*.whl"))
    if not wheels:
        pytest.fail(f"no tensorrt-cu12-bindings {VERSIONS[0]} wheel in {WHEELS}: run `make setup`")
    install(wheels[0], tmp_path)
    probe = (
        "import os; os.environ['TRT_STANDIN_VERSION'] = '10.8.0.43'\n"
        "import tensorrt as trt\n"
        "from prumerge_cli.errors import PrumergeError\n"
        "from prumerge_cli.plugins.trt_plugins import register_plugins\n"
        "try:\n    register_plugins()\nexcept PrumergeError as e:\n    print(e)\n"
        "print(len(trt.get_plugin_registry().creators))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [
        "TensorRT 10.8.0.43 is installed; prumerge's plugins need TensorRT >= 10.9, < 12",
        "0",
    ]
