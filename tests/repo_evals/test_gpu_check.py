"""The one-shot GPU check's (``evals/gpu/``) CPU-testable parts."""

from __future__ import annotations

import importlib
import json
import os

import numpy as np
import pytest
import torch

from evals.gpu.stages_engine import compare_values
from evals.gpu.stages_setup import MODEL_CONFIG


def load_script():
    saved = dict(os.environ)  # the check sets offline variables for itself: not for the tests
    try:
        return importlib.import_module("evals.gpu.check")
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA failure")
def test_cuda_requested_without_cuda_fails_loudly(tmp_path, capsys):
    gpu_check = load_script()
    code = gpu_check.main(["--device", "cuda", "--out-dir", str(tmp_path)])
    assert code == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err
    (written,) = tmp_path.glob("gpu_check_*.json")
    result = json.loads(written.read_text())
    assert result["status"] == "SETUP ERROR"
    assert result["machine"]["cuda_available"] is False


def test_compare_uses_relative_tolerance_and_missing_pattern():
    cpu = np.array([[1e-2, 2e-3], [np.nan, 5e-4]])
    close = compare_values(cpu * (1 + 5e-4), cpu)
    assert close["allclose"] and close["same_missing"] and close["max_rel"] < 1e-3
    assert not compare_values(cpu * (1 + 2e-3), cpu)["allclose"]
    shifted = cpu.copy()
    shifted[1, 0] = 1.0
    assert not compare_values(shifted, cpu)["allclose"]
    assert compare_values([1.0, 2.0], [1.0, None])["same_missing"] is False


def test_random_model_config_is_gemma3_270m():
    cfg = json.loads(MODEL_CONFIG.read_text())
    assert cfg["architectures"] == ["Gemma3ForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (18, 640, 262144)
