"""Shared fixtures: tiny real checkpoints and image files, built once per session."""

from __future__ import annotations

import os

# Plugin kernels are tested on the CPU with Triton's interpreter, which must be chosen before anything
# imports triton (torch does, at import). PRUMERGE_TRITON_GPU=1 leaves compiled GPU kernels in place.
if not os.environ.get("PRUMERGE_TRITON_GPU"):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

from . import tiny_models


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    return tiny_models.save_clip_vision(tmp_path_factory.mktemp("models") / "clip")


@pytest.fixture(scope="session")
def clip_full_dir(tmp_path_factory):
    return tiny_models.save_clip_full(tmp_path_factory.mktemp("models") / "clip_full")


@pytest.fixture(scope="session")
def siglip_dir(tmp_path_factory):
    return tiny_models.save_siglip_vision(tmp_path_factory.mktemp("models") / "siglip")


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory):
    return tiny_models.save_llava(tmp_path_factory.mktemp("models") / "llava")


@pytest.fixture(scope="session")
def llava_deep_dir(tmp_path_factory):
    """Four decoder layers (the predictors sit at layer 2) and grouped-query attention."""
    return tiny_models.save_llava(tmp_path_factory.mktemp("models") / "llava_deep", layers=4, kv_heads=1)


@pytest.fixture(scope="session")
def image_paths(tmp_path_factory):
    return tiny_models.save_images(tmp_path_factory.mktemp("images"), count=4)
