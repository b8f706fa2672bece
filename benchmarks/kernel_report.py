"""The plugin kernels as a GPU would see them, measured here without one:

- PTX: each AOT kernel compiled for sm_80 and sm_90a at ViT-L/14-336's shapes (576 patches x 1024 channels) and
  at decode-step attention shapes (head size 128), assembled by ptxas -v: registers, spills, MMA instructions;
- reads: global-memory bytes each kernel reads (requested, and at distinct addresses) against the bytes its
  inputs need at the least, counted under Triton's interpreter on the same shapes.

Writes kernel_report.json (or argv[1]). Run by `make bench`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # the reads are counted under the interpreter: before triton loads

PTX_PART = """
import json, sys
from prumerge_cli.plugins.kernels import aot, ptx_report
rows = []
def row(name, kernel, arch):
    return {"kernel": name, **vars(ptx_report.report(kernel.ptx, arch))}
for capability, arch in (((8, 0), "sm_80"), ((9, 0), "sm_90a")):
    for dtype in ("fp16", "fp32"):
        for plus in (False, True):
            kernel = aot.compile_adaptive_token_select(dtype, 576, 1024, plus, 1.5, 32, 3, capability)
            rows.append(row(f"select{'+' if plus else ''} {dtype} 576x1024", kernel, arch))
        for group in (1, 4):
            kernel = aot.compile_sparse_kv_attention(dtype, 128, True, group, capability)
            rows.append(row(f"decode attention {dtype} d128 group {group}", kernel, arch))
json.dump(rows, sys.stdout)
"""


def ptx_rows() -> list[dict]:
    """ptxas figures per kernel, compiled in a process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", PTX_PART], capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout)


def read_rows() -> list[dict]:
    """Bytes read per kernel against the minimum, under the interpreter."""
    import torch

    from prumerge_cli.plugins.kernels.sparse_kv_attention import sparse_kv_attention
    from prumerge_cli.plugins.kernels.token_select import adaptive_token_select
    from prumerge_cli.plugins.kernels.traffic import count_reads
    from tests.test_reducer_parity import synthetic_signals

    rows = []
    signals = synthetic_signals(batch=1, n=576, c=1024, seed=0)
    x, s, k = (t.half() for t in (signals.features, signals.scores, signals.keys))
    minimum = 2 * x.numel() * 2 + s.numel() * 2
    for plus in (False, True):
        with count_reads() as reads:
            _, lengths, _ = adaptive_token_select(x, s, k, plus=plus)
        rows.append({"kernel": f"select{'+' if plus else ''} fp16 576x1024", "tokens": int(lengths[0]),
                     "minimum": minimum, "requested": reads.requested, "distinct": reads.distinct})  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for heads, kv_heads in ((32, 32), (32, 8)):  # Vicuna-7B; a GQA model with 4 query heads per KV head
        q = torch.randn(1, heads, 1, 128, generator=gen).half()
        cache = [torch.randn(1, kv_heads, 1024, 128, generator=gen).half() for _ in range(2)]
        keep = torch.rand(1, 1024, generator=gen) > 0.4
        valid = 700
        with count_reads() as reads:
            sparse_kv_attention(q, *cache, torch.tensor([valid]), keep, causal=True, splits=4)
        minimum = q.numel() * 2 + 2 * kv_heads * valid * 128 * 2 + 4 + valid
        name = f"decode attention fp16 {heads}/{kv_heads} heads, {valid} of 1024 slots, 4 splits (+ partials)"
        rows.append({"kernel": name,
                     "minimum": minimum, "requested": reads.requested, "distinct": reads.distinct})  # fmt: skip
    return rows


def main() -> None:
    """Print both tables and write the JSON."""
    from prumerge_cli import atomic

    ptx = ptx_rows()
    print(f"{'kernel':42s} {'arch':7s} {'PTX':4s} {'regs':>4s} {'spill B':>8s} {'MMA':>4s}")
    for row in ptx:
        spills = row["spill_stores"] + row["spill_loads"]
        print(f"{row['kernel']:42s} {row['arch']:7s} {row['ptx_version']:4s} {row['registers']:4d} {spills:8d} "
              f"{row['mma']:4d}")  # fmt: skip
    reads = read_rows()
    print(f"\n{'kernel':80s} {'minimum B':>10s} {'requested':>10s} {'distinct':>9s}")
    for row in reads:
        print(f"{row['kernel']:80s} {row['minimum']:10d} x{row['requested'] / row['minimum']:9.2f} "
              f"x{row['distinct'] / row['minimum']:8.2f}")  # fmt: skip
    path = sys.argv[1] if len(sys.argv) > 1 else "kernel_report.json"
    atomic.write_text(path, json.dumps({"ptx": ptx, "reads": reads}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
