"""Compressed bundles: `reducer.json` naming the model (path and weight hash) and the reducer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import atomic
from .encoder import ReducedVisionEncoder
from .errors import PrumergeError
from .jsonfiles import read_json_object
from .model_ref import model_record, resolve_model, verify_weights
from .versions import package_versions

BUNDLE_FILE = "reducer.json"
FORMAT = "prumerge-bundle"
FORMAT_VERSION = 2  # 2: model path relative to the bundle, weight fingerprints
READS = (1, 2)


def write_bundle(encoder: ReducedVisionEncoder, bundle_dir: Path, force: bool = False) -> Path:
    """Write `bundle_dir/reducer.json` atomically; an existing directory needs `force`."""
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **encoder.settings(),
        "model": model_record(encoder.model_dir, bundle_dir, encoder.model.weight_files, encoder.model.model_type),
        "versions": package_versions(),
    }
    with atomic.atomic_dir(bundle_dir, force=force) as tmp:
        (tmp / BUNDLE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return bundle_dir


def is_bundle(path: str | Path) -> bool:
    """Whether `path` is a bundle directory."""
    return (Path(path) / BUNDLE_FILE).is_file()


def read_bundle(bundle_dir: str | Path) -> dict[str, Any]:
    """The bundle's record, validated."""
    path = Path(bundle_dir) / BUNDLE_FILE
    record = read_json_object(path, f"{bundle_dir} is not a bundle (no {BUNDLE_FILE})")
    if record.get("format") != FORMAT:
        raise PrumergeError(f"{path} is not a prumerge bundle")
    if record.get("format_version") not in READS:
        version = record.get("format_version")
        raise PrumergeError(f"{path} has bundle format {version}; this prumerge reads {', '.join(map(str, READS))}")
    return record


def load(
    bundle_dir: str | Path,
    method: str | None = None,
    params: dict[str, Any] | None = None,
    verify: bool = True,
    model_dir: str | Path | None = None,
    full_hash: bool = False,
    **options: Any,
) -> ReducedVisionEncoder:
    """Rebuild the encoder a bundle describes; `verify` checks that the model's weights are unchanged (by their
    fingerprints, or by their full hash if `full_hash`). `model_dir` overrides where the model is.

    A fine-tuned bundle's encoder has its trained projector (its LM adapters: `finetune.bundle.load_finetuned_lm`).
    `method` replaces the recorded reducer; `params` update the recorded parameters (or, with another method,
    replace them); `options` replace encoder settings (`dtype`, `attn_implementation`, `score_layer`, ...).
    """
    record = read_bundle(bundle_dir)
    if record["method"] == "dynamic":
        raise PrumergeError(f"{bundle_dir} holds learned predictors, which act inside the LLM: `prumerge export` "
                            "writes its decode step and `prumerge bench` measures it")  # fmt: skip
    method = method or record["method"]
    merged = {**(record["params"] if method == record["method"] else {}), **(params or {})}
    settings = {**{k: record[k] for k in ("dtype", "score_layer", "score_dtype")}, **options}
    settings.setdefault("positions", record.get("positions", "contiguous"))  # bundles before the setting
    model = resolve_model(record["model"], Path(bundle_dir), None if model_dir is None else Path(model_dir))
    if "family" in record:  # LLaVA-NeXT, OneVision, InternVL, Gemma 3
        from .families.model import FamilyEncoder

        family = FamilyEncoder.from_pretrained(model, method, dtype=settings["dtype"], positions=settings["positions"],
                                               scope=options.get("scope", record["scope"]), **merged)  # fmt: skip
        if verify:
            verify_weights(record["model"], model, family.model.weight_files, full_hash)
        return family  # type: ignore[return-value]
    encoder = ReducedVisionEncoder.from_pretrained(model, method, **settings, **merged)
    if verify:
        verify_weights(record["model"], model, encoder.model.weight_files, full_hash)
    if record.get("regime") == "fine-tuned":  # the projector trained with the reducer active
        from .finetune.bundle import load_projector

        load_projector(Path(bundle_dir), encoder.projector)
    return encoder
