"""Loading an SAE folder by spec (``csae_plugin/saes/loading.py``): a missing or corrupt folder
is one clear error."""

from __future__ import annotations

import pytest
from conftest import trained_causal_sae

from csae_plugin.saes.loading import SAELoadError, load_sae_from_folder


def test_corrupt_or_missing_sae_folder_gives_a_clear_error(tmp_path):
    with pytest.raises(SAELoadError, match="does not exist"):
        load_sae_from_folder(tmp_path / "nope")
    trained_causal_sae("topk")[0].save_inference_model(tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(SAELoadError, match="is corrupt"):
        load_sae_from_folder(tmp_path)
