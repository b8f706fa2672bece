"""What a GPU would see of a kernel's PTX, read without a GPU: Triton's bundled `ptxas -v` (registers, spills,
shared memory, whether the PTX ISA version is accepted) and the instruction mix (tensor-core MMA, TF32)."""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PtxReport:
    """ptxas's resource usage of one kernel for one GPU architecture, and its PTX's instruction mix."""

    arch: str
    ptx_version: str
    registers: int
    spill_stores: int
    spill_loads: int
    mma: int
    tf32_mma: int

    def line(self) -> str:
        """One line for a log: architecture, PTX version, registers, spills, MMA instructions."""
        return (f"{self.arch} PTX {self.ptx_version}: {self.registers} registers, {self.spill_stores} B spill "
                f"stores, {self.spill_loads} B spill loads, {self.mma} MMA ({self.tf32_mma} TF32)")  # fmt: skip


def ptxas_path() -> str:
    """The ptxas that Triton bundles (CUDA 12.x for sm_80 and sm_90)."""
    from triton import knobs

    return knobs.nvidia.ptxas.path


def report(ptx: str, arch: str) -> PtxReport:
    """Assemble `ptx` for `arch` (e.g. "sm_80", "sm_90a") with `ptxas -v`; raises RuntimeError if it refuses."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        done = subprocess.run([ptxas_path(), "-v", f"--gpu-name={arch}", str(source), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"ptxas refused the PTX for {arch}: {done.stderr.strip()[-500:]}")
    log = done.stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    version = re.search(r"^\.version (\S+)", ptx, re.MULTILINE).group(1)
    mma = re.findall(r"^\s*(?:wgmma\.mma_async|mma\.sync)\S*", ptx, re.MULTILINE)
    return PtxReport(arch, version, registers, int(spills.group(1)), int(spills.group(2)), len(mma),
                     sum(".tf32" in op for op in mma))  # fmt: skip
