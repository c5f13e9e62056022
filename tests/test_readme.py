"""The README's Python snippets run as written, and the GPU example configs build."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


# 1. the README's snippets (train a causal SAE with SAELens's config, then load it) run in order
def test_readme_snippets_run(tmp_path, monkeypatch, capsys):
    snippets = readme_snippets()
    assert len(snippets) >= 2
    monkeypatch.chdir(tmp_path)
    for snippet in snippets:
        exec(compile(snippet, "README.md", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out.split("\n")
    assert "causal" in printed
    assert "TopKSAE 256" in printed
    assert printed.count("causal") == 2  # trained as "causal", provenance kept when loaded
    assert (tmp_path / "my_causal_sae" / "cfg.json").is_file()
    # the cached-activations snippet trained both SAEs from one pass of the model
    assert all(
        (tmp_path / "saes" / n / "cfg.json").is_file() for n in ("topk_256_k8", "causal_256_k8")
    )


# 2. the GPU example configs build for both setups and both architectures
@pytest.mark.parametrize("setup", ["gpt2-small", "gemma-2-2b"])
@pytest.mark.parametrize("architecture", ["causal", "topk"])
def test_gpu_example_configs(setup, architecture, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    sys.modules.pop("train_gpu", None)
    import train_gpu

    cfg = train_gpu.runner_config(setup, architecture, None, "cpu")
    assert cfg.sae.architecture() == architecture
    assert cfg.hook_name == train_gpu.SETUPS[setup].hook_name
    assert cfg.sae.d_in == train_gpu.SETUPS[setup].d_in
    if architecture == "causal":  # the KL fine-tune at the anchors' 16k tokens per KL step
        assert cfg.sae.kl_batch_size * cfg.context_size == train_gpu.KL_TOKENS
        assert cfg.sae.kl_finetune_fraction > 0 and cfg.sae.kl_positions == 0
