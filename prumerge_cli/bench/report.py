"""Present a bench report: rich tables, JSON (schema `prumerge-bench` v1) and plots (PNG, JPEG, SVG or PDF)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from rich.console import Console

from .. import atomic
from ..errors import PrumergeError
from ..tables import FoldingTable

PLOT_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".svg": "svg", ".pdf": "pdf"}
"""What `--plot` writes, by the file's suffix."""


def plot_format(path: Path) -> str:
    """The plot format a path's suffix names; any other suffix is refused in one line."""
    try:
        return PLOT_FORMATS[path.suffix.lower()]
    except KeyError:
        raise PrumergeError(f"--plot writes {', '.join(PLOT_FORMATS)} files; {path.name} has none of these "
                            "suffixes") from None  # fmt: skip


def write_json(report: dict[str, Any], path: Path) -> None:
    """The report, atomically."""
    atomic.write_text(path, json.dumps(report, indent=2) + "\n")


def print_tables(report: dict[str, Any], console: Console) -> None:
    """Encoder table per batch size, then the LLM table."""
    for batch in report["settings"]["batch_sizes"]:
        table = FoldingTable(f"Encoder (tower + reducer + projector), batch {batch}: ratio = variant / baseline",
                              ["variant", "backend", "tokens mean [min-max]", "p50 ms", "p90 ms", "img/s", "+MiB",
                               "fidelity"], left=("backend", "fidelity"))  # fmt: skip
        for row in report["encoder"]:
            b = row["by_batch"][str(batch)]
            t, r = row["tokens"], b["ratios"]
            table.add_row(
                row["variant"], row["backend"], f"{t['mean']:.1f} [{t['min']}-{t['max']}] x{t['ratio']:.2f}",
                f"{b['latency_ms']['p50']:.1f} x{r['latency']:.2f}", f"{b['latency_ms']['p90']:.1f}",
                f"{b['images_per_s']:.1f}", memory_text(b), fidelity_text(row["fidelity"]),
            )  # fmt: skip
        table.print(console)
    if report["llm"]:
        title = f"LLM ({report['llm'][0]['llm']}): prefill and one decode step with each variant's tokens"
        table = FoldingTable(title, ["variant", "batch", "seq tokens", "prefill ms", "ideal", "decode ms", "KV MiB",
                               "answers"], left=("answers",))  # fmt: skip
        for row in report["llm"]:
            r = row["ratios"]
            ideal = row.get("cost_model", {}).get("ideal_prefill_ratio")
            table.add_row(
                row["variant"], str(row["batch"]), str(row["sequence_tokens"]),
                f"{row['prefill_ms']['p50']:.1f} x{r['prefill']:.2f}", "-" if ideal is None else f"x{ideal:.2f}",
                f"{row['decode_step_ms']['p50']:.1f} x{r['decode_step']:.2f}",
                f"{row['kv_cache_bytes'] / 2**20:.2f} x{r['kv_cache']:.2f}", fidelity_text(row.get("fidelity", {})),
            )  # fmt: skip
        table.print(console)
    for section in report.get("dynamic", []):
        print_dynamic(section, console)


def print_dynamic(section: dict[str, Any], console: Console) -> None:
    """A predictor bundle against the same model keeping every token: ratio = dynamic / dense."""
    table = FoldingTable(f"Dynamic-LLaVA {section['bundle']} vs the same model keeping every token",
                          ["batch", "image tokens", "output kept", "prefill ms", "decode step ms", "KV MiB",
                           "fidelity"], left=("fidelity",))  # fmt: skip
    for row in section["rows"]:
        fid = row["fidelity"]
        text = f"KL {fid['next_token_kl']:.3f}, same answer {100 * fid['greedy_agreement']:.0f}%"
        if "vqa_accuracy_dynamic" in fid:
            text += f", acc {100 * fid['vqa_accuracy_dynamic']:.1f}% (dense {100 * fid['vqa_accuracy_dense']:.1f}%)"
        p, d, kv = row["prefill_ms"], row["decode_step_ms"], row["kv_cache_bytes"]
        table.add_row(
            str(row["batch"]), f"{row['image_tokens']['dynamic']:.0f} of {row['image_tokens']['dense']:.0f}",
            f"{100 * row['output_tokens_kept']:.0f}% of {row['new_tokens'] - 1}",
            f"{p['dynamic']:.1f} x{p['ratio']:.2f}", f"{d['dynamic']:.2f} x{d['ratio']:.2f}",
            f"{kv['dynamic'] / 2**20:.2f} x{kv['ratio']:.2f}", text,
        )  # fmt: skip
    table.print(console)
    console.print("KV MiB: bytes the paged cache allocated after the generation (blocks of 16 tokens).")
    for row in section["rows"]:
        if "kv_projection" in row:
            p = row["kv_projection"]
            console.print(f"batch {row['batch']}, {p['llm']} (cost model, {p['image_tokens']} image tokens, same "
                          f"decisions): KV {p['dynamic'] / 2**20:.1f} MiB per sequence x{p['ratio']:.2f}")  # fmt: skip


def memory_text(by_batch: dict[str, Any]) -> str:
    """The memory increase of a call, with its ratio to the baseline where that ratio means something."""
    ratio = by_batch["ratios"]["memory"]
    return f"{by_batch['memory']['increase_mib']:.1f}" + ("" if ratio is None else f" x{ratio:.2f}")


def fidelity_text(fidelity: dict[str, Any]) -> str:
    """The fidelity figures a row has, short."""
    parts = []
    if "vqa_accuracy" in fidelity:
        parts.append(f"acc {100 * fidelity['vqa_accuracy']:.1f}%")
    if "next_token_kl" in fidelity:
        parts.append(f"KL {fidelity['next_token_kl']:.3f}, same answer {100 * fidelity['greedy_agreement']:.0f}%")
    if "mean_embedding_cosine" in fidelity:
        parts.append(f"cos {fidelity['mean_embedding_cosine']:.3f}")
    return ", ".join(parts) or "-"


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Latency (largest batch; bars from the 10th to the 90th percentile) and fidelity against visual tokens
    kept, one point per variant and backend, each labelled; a log latency axis only where the values span more
    than a factor of 3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = str(max(report["settings"]["batch_sizes"]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    latencies = []
    for backend, marker in (("torch", "o"), ("ort", "s"), ("trt", "^")):
        rows = [r for r in report["encoder"] if r["backend"] == backend]
        if rows:
            points = [(r["tokens"]["mean"], r["by_batch"][batch]["latency_ms"], r["variant"]) for r in rows]
            plot_points(left, points, marker, f"encoder {backend}", backend)
            latencies += [lat["p50"] for _, lat, _ in points]
    llm = [r for r in report["llm"] if str(r["batch"]) == batch]
    if llm:
        tokens = {r["variant"]: r["tokens"]["mean"] for r in report["encoder"]}
        points = [(tokens[r["variant"]], r["prefill_ms"], r["variant"]) for r in llm]
        plot_points(left, points, "x", "LLM prefill", "LLM")
        latencies += [lat["p50"] for _, lat, _ in points]
    log = max(latencies) / max(min(latencies), 1e-9) > 3
    left.set(xlabel="visual tokens kept (mean)", ylabel=f"latency at batch {batch} (ms): p50, bars p10-p90",
             title="Latency", yscale="log" if log else "linear")  # fmt: skip
    if not log:
        left.set_ylim(bottom=0)
    left.legend(fontsize=8)
    key, label = fidelity_axis(report)
    rows = [r for r in report["encoder"] if r["backend"] == "torch"] or report["encoder"]
    right.scatter([r["tokens"]["mean"] for r in rows], [r["fidelity"].get(key, float("nan")) for r in rows])
    for k, r in enumerate(rows):
        right.annotate(r["variant"], (r["tokens"]["mean"], r["fidelity"].get(key, float("nan"))), fontsize=7,
                       xytext=(4, 4 + 9 * (k % 3)), textcoords="offset points")  # fmt: skip
    right.set(xlabel="visual tokens kept (mean)", ylabel=label, title="Fidelity")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=plot_format(path), dpi=120)
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())


def plot_points(axes, points: list[tuple[float, dict[str, float], str]], marker: str, legend: str, tag: str) -> None:
    """Median latencies with p10-p90 bars, each labelled 'variant (tag)', labels staggered so they do not overprint."""
    x = [p[0] for p in points]
    mid = [p[1]["p50"] for p in points]
    low = [p[1]["p50"] - p[1].get("p10", p[1]["p50"]) for p in points]
    high = [p[1]["p90"] - p[1]["p50"] for p in points]
    axes.errorbar(x, mid, yerr=[low, high], fmt=marker, capsize=3, label=legend)
    for k, (xi, yi, (_, _, name)) in enumerate(zip(x, mid, points, strict=True)):
        axes.annotate(
            f"{name} ({tag})", (xi, yi), fontsize=7, xytext=(5, -10 + 9 * (k % 3)), textcoords="offset points"
        )


def fidelity_axis(report: dict[str, Any]) -> tuple[str, str]:
    """Accuracy when the run measured it, else embedding cosine."""
    if any("vqa_accuracy" in r["fidelity"] for r in report["encoder"]):
        return "vqa_accuracy", "held-out VQA accuracy"
    return "mean_embedding_cosine", "cosine of mean LLM-input embedding vs baseline"
