"""Fixtures: tiny Stable-Diffusion-1.x-shaped pipelines built from configs (random weights, no download)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from erasekit.testing import make_tiny_sd

# Small models run fastest on one thread, and a second thread only oversubscribes a busy CPU.
torch.set_num_threads(int(os.environ.get("ERASEKIT_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "sd", seed=0)


@pytest.fixture(scope="session")
def tiny_sd_other(tmp_path_factory) -> Path:
    """Same architecture, other weights: a different base model."""
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd_other") / "sd", seed=1)


@pytest.fixture(scope="session")
def tiny_sd_wide(tmp_path_factory) -> Path:
    """Another architecture: a wider text encoder and cross-attention."""
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd_wide") / "sd", seed=0, cross_attention_dim=48)


@pytest.fixture(scope="session", params=["epsilon", "sample", "v_prediction"])
def tiny_sd_any(request, tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp(f"tiny_sd_{request.param}") / "sd",
                        prediction_type=request.param, seed=0)


@pytest.fixture(scope="session")
def tiny_sd_no_xattn(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd_noxattn") / "sd", cross_attention=False)
