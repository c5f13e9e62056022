"""The "causal" architecture (``csae_plugin/saes/causal.py``): registration, training through
SAELens's runner, saving the final SAE as the plain SAELens SAE it is equivalent to (loadable
without the plugin), checkpoints that resume exactly, parity with the baselines, the conformance
behaviours SAELens checks for its own architectures, and config errors."""

from __future__ import annotations

import importlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    ACTIVATIONS,
    D_MODEL,
    HOOK,
    SAVED_AS,
    causal_cfg,
    make_tokens,
    runner_config,
    trained_causal_sae,
)
from sae_lens import (
    SAE,
    BatchTopKTrainingSAEConfig,
    HookedSAETransformer,
    LanguageModelSAETrainingRunner,
    TopKTrainingSAEConfig,
)
from sae_lens.config import SAETrainerConfig
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import save_file

import csae_plugin
from csae_plugin import (
    CausalSAE,
    CausalSAEConfig,
    CausalSAETrainingRunner,
    CausalTrainingSAE,
    CausalTrainingSAEConfig,
)
from csae_plugin.saes.loading import load_sae_from_folder
from csae_plugin.training import TrainSpec, train_sae


# 1. registration
def test_importing_registers_causal_for_training_and_for_0_1_0_folders():
    assert SAE_TRAINING_CLASS_REGISTRY["causal"] == (CausalTrainingSAE, CausalTrainingSAEConfig)
    assert SAE_CLASS_REGISTRY["causal"] == (CausalSAE, CausalSAEConfig)


def test_registration_is_idempotent_on_reimport_and_reload():
    importlib.import_module("csae_plugin")
    csae_plugin.saes.register()
    reloaded = importlib.reload(csae_plugin.saes)
    reloaded.register()
    assert "causal" in SAE_CLASS_REGISTRY and "causal" in SAE_TRAINING_CLASS_REGISTRY


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_causal_training_sae_is_the_upstream_class_plus_the_causal_terms(activation):
    sae = CausalTrainingSAE(causal_cfg(activation))
    upstream = {"topk": "TopKTrainingSAE", "batchtopk": "BatchTopKTrainingSAE"}
    upstream["relu"] = "StandardTrainingSAE"
    assert isinstance(sae, CausalTrainingSAE)
    assert upstream[activation] in [c.__name__ for c in type(sae).__mro__]
    saved_cfg = sae.cfg.get_inference_config_class()(d_in=D_MODEL, d_sae=64)
    assert isinstance(SAE.from_dict(saved_cfg.to_dict()), SAVED_AS[activation])


# 2. saved as plain SAELens SAEs, loadable by a process that never imports csae_plugin
_FRESH_PROCESS_CHECK = """
import json, sys, torch
from safetensors.torch import load_file
from sae_lens import SAE
from sae_bench.sae_bench_utils.general_utils import check_decoder_norms

cases = json.loads(sys.argv[1])
for case in cases:
    sae = SAE.load_from_disk(case["folder"])
    expected = load_file(case["expected"])
    assert type(sae).__name__ == case["cls"], (type(sae).__name__, case)
    meta = sae.cfg.metadata
    assert meta.training_architecture == "causal", meta
    assert meta.csae_plugin_version, meta
    assert "lambda_kl" in meta.training_architecture_details, meta
    with torch.no_grad():
        acts = sae.encode(expected["x"])
        torch.testing.assert_close(acts, expected["acts"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sae.decode(acts), expected["recons"], rtol=1e-4, atol=1e-4)
    assert check_decoder_norms(sae.W_dec), case
assert not any(m.startswith("csae_plugin") for m in sys.modules), "csae_plugin was imported"
print("ok", len(cases))
"""


def _expected(sae: CausalTrainingSAE, path: Path) -> Path:
    """What the training SAE computes on a fixed input, as its saved inference SAE should."""
    torch.manual_seed(7)
    x = torch.randn(32, D_MODEL) * 3 + 1
    with torch.no_grad():
        acts = sae.encode_as_saved(x)
        recons = sae.decode(acts)
    if sae.cfg.activation == "relu":  # saved with decoder norms folded: latents scale by them
        acts = acts * sae.W_dec.norm(dim=-1)
    save_file({"x": x, "acts": acts.contiguous(), "recons": recons.contiguous()}, path)
    return path


def _check_in_fresh_process(cases: list[dict]) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS_CHECK, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith(f"ok {len(cases)}")


def _save_final_two_ways(sae: CausalTrainingSAE, out: Path, runner_folder: Path) -> list[dict]:
    """The runner's final folder and ``save_inference_model``'s (``save_model`` writes a
    checkpoint, in the training form: ``test_checkpoint_*``)."""
    sae.save_inference_model(out / "save_inference_model")
    folders = [out / "save_inference_model", runner_folder]
    expected = _expected(sae, out / "expected.safetensors")
    cls = SAVED_AS[sae.cfg.activation].__name__
    return [{"folder": str(f), "expected": str(expected), "cls": cls} for f in folders]


@pytest.mark.parametrize("path", ["plain_runner", "causal_runner", "train_sae"])
def test_saved_causal_sae_loads_without_the_plugin_with_the_same_outputs(
    tiny_model, tiny_dataset, tiny_tokens, tmp_path, path
):
    cases = []
    for activation in ACTIVATIONS:
        out = tmp_path / activation
        overrides = {"activation": activation, "kl_every": 2}
        if path == "train_sae":
            _, runner = train_sae(
                tiny_model,
                HOOK,
                tiny_tokens,
                TrainSpec("causal", 64, k=4, overrides=overrides),
                training_tokens=16 * 64,
                batch_size_tokens=64,
                output_path=out / "runner",
            )
            sae = runner.sae
        else:
            runner_cls = (
                LanguageModelSAETrainingRunner
                if path == "plain_runner"
                else CausalSAETrainingRunner
            )
            cfg = runner_config(
                causal_cfg(**overrides, k=4), out / "runner", training_tokens=16 * 64
            )
            sae = runner_cls(cfg, override_model=tiny_model, override_dataset=tiny_dataset).run()
        assert isinstance(sae, CausalTrainingSAE)
        cases += _save_final_two_ways(sae, out, out / "runner")
    _check_in_fresh_process(cases)


def test_plain_runner_says_once_that_the_causal_terms_are_off(
    tiny_model, tiny_dataset, tmp_path, caplog
):
    cfg = runner_config(causal_cfg(kl_every=2), tmp_path / "out", training_tokens=16 * 64)
    with caplog.at_level(logging.WARNING):
        sae = LanguageModelSAETrainingRunner(
            cfg, override_model=tiny_model, override_dataset=tiny_dataset
        ).run()
    assert sae.cfg.architecture() == "causal"
    warnings = [r for r in caplog.records if "no language model attached" in r.getMessage()]
    assert len(warnings) == 1
    saved = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert saved["architecture"] == "topk"
    details = saved["metadata"]["training_architecture_details"]
    assert details["kl_every"] == 2 and details["lambda_kl"] == 1.0


# 3. with lambda_kl=0 a causal SAE is its baseline: same seed, same weights
@pytest.mark.parametrize(
    ("activation", "baseline"),
    [("topk", TopKTrainingSAEConfig), ("batchtopk", BatchTopKTrainingSAEConfig)],
)
def test_causal_sae_without_kl_trains_to_the_baselines_weights(
    tiny_model, tiny_dataset, activation, baseline
):
    weights = []
    for cfg_sae, runner_cls in [
        (baseline(d_in=D_MODEL, d_sae=64, k=4), LanguageModelSAETrainingRunner),
        (causal_cfg(activation, lambda_kl=0.0), CausalSAETrainingRunner),
    ]:
        cfg = runner_config(cfg_sae, training_tokens=16 * 256, seed=3)
        torch.manual_seed(3)  # SAELens's runner does not seed torch itself
        sae = runner_cls(cfg, override_model=tiny_model, override_dataset=tiny_dataset).run()
        weights.append({k: v.clone() for k, v in sae.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    assert any(torch.count_nonzero(v) for v in weights[0].values())
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name


def test_plain_runner_trains_a_topk_baseline(tiny_model, tiny_dataset, tmp_path):
    cfg = runner_config(TopKTrainingSAEConfig(d_in=D_MODEL, d_sae=64, k=4), tmp_path / "topk")
    sae = LanguageModelSAETrainingRunner(
        cfg, override_model=tiny_model, override_dataset=tiny_dataset
    ).run()
    assert SAE.load_from_disk(tmp_path / "topk").cfg.architecture() == "topk"
    assert sae.cfg.d_sae == 64


# 4. checkpoints keep the training form (as SAELens's BatchTopK), so a run resumes exactly
def _buffers_off_init(sae: CausalTrainingSAE) -> CausalTrainingSAE:
    """Buffers at values training reaches and a fresh SAE lacks (reweight's l1_weights)."""
    with torch.no_grad():
        if sae.cfg.activation == "relu":
            sae.l1_weights.copy_(torch.rand(sae.cfg.d_sae) + 0.5)
        if sae.cfg.activation == "batchtopk":
            sae.topk_threshold.fill_(0.3)
    return sae


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module, cast: bool = False) -> None:
    """Every parameter and buffer equal (with ``cast``, after a cast to ``b``'s dtypes)."""
    assert a.state_dict().keys() == b.state_dict().keys()
    for name, value in a.state_dict().items():
        other = b.state_dict()[name]
        assert torch.equal(value.to(other.dtype) if cast else value, other), name


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_checkpoint_round_trip_keeps_every_parameter_and_buffer(tmp_path, activation):
    """SAELens's test_TrainingSAE_save_and_load_from_checkpoint, buffers included."""
    sae = _buffers_off_init(trained_causal_sae(activation)[0])
    sae.save_model(tmp_path)
    saved = json.loads((tmp_path / "cfg.json").read_text())
    assert (saved["architecture"], saved["activation"]) == ("causal", activation)
    assert saved["metadata"]["training_architecture"] == "causal"
    loaded = TrainingSAE.from_dict(sae.cfg.to_dict())
    loaded.load_weights_from_checkpoint(tmp_path)
    _assert_same_state(sae, loaded)
    again = TrainingSAE.load_from_disk(tmp_path)
    assert type(again) is type(sae)
    _assert_same_state(sae, again, cast=True)  # SAELens casts all to cfg.dtype (the threshold)


def _train(activation: str, batches: list, checkpoints=None, resume=None) -> CausalTrainingSAE:
    """SAELens's trainer over ``batches`` (one checkpoint half-way into ``checkpoints``), or
    resumed from the checkpoint ``resume`` on the batches it had not seen."""
    torch.manual_seed(0)
    sae = _buffers_off_init(CausalTrainingSAE(causal_cfg(activation, lambda_kl=0.0)))
    cfg = SAETrainerConfig(
        total_training_samples=64 * len(batches),
        train_batch_size_samples=64,
        lr=1e-3,
        lr_end=1e-4,
        checkpoint_path=None if checkpoints is None else str(checkpoints),
        n_checkpoints=int(checkpoints is not None),
    )
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))
    if resume is not None:
        trainer.load_trainer_state(resume)
        sae.load_weights_from_checkpoint(resume)
        assert 0 < trainer.n_training_samples < cfg.total_training_samples
    trainer.data_provider = iter(batches[trainer.n_training_samples // 64 :])
    return trainer.fit()


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_training_resumed_from_a_checkpoint_equals_one_uninterrupted_run(tmp_path, activation):
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(64, D_MODEL, generator=generator) * 3 + 1 for _ in range(20)]
    one_go = _train(activation, batches, checkpoints=tmp_path)
    (checkpoint,) = tmp_path.iterdir()
    _assert_same_state(one_go, _train(activation, batches, resume=checkpoint))


@pytest.mark.parametrize(
    ("activation", "rescale"),
    [("relu", True), ("topk", True), ("topk", False), ("batchtopk", True), ("batchtopk", False)],
)
def test_checkpoint_folder_loads_as_the_final_plain_sae(tmp_path, activation, rescale):
    k = 4.5 if activation == "batchtopk" else 4  # an average k may be fractional
    sae = _buffers_off_init(
        trained_causal_sae(activation, k=k, rescale_acts_by_decoder_norm=rescale)[0]
    )
    sae.save_model(tmp_path / "checkpoint")
    sae.save_inference_model(tmp_path / "final")
    final = SAE.load_from_disk(tmp_path / "final")
    from_checkpoint = SAE.load_from_disk(tmp_path / "checkpoint")
    assert type(from_checkpoint) is type(final) is SAVED_AS[activation]
    assert from_checkpoint.cfg.to_dict() == final.cfg.to_dict()
    _assert_same_state(final, from_checkpoint)
    _assert_same_state(final, load_sae_from_folder(tmp_path / "checkpoint"))  # sae_bench's


# 5. conformance with SAELens's own architecture tests
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fold_activation_norm_scaling_factor_preserves_outputs(activation):
    sae, _ = trained_causal_sae(activation)
    sae.eval()
    scale = 3.7
    x = torch.randn(64, D_MODEL) * 2
    expected = sae.decode(sae.encode(x * scale)) / scale
    sae.fold_activation_norm_scaling_factor(scale)
    torch.testing.assert_close(sae.decode(sae.encode(x)), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fold_W_dec_norm_preserves_outputs_and_normalises_decoder(activation):
    sae, _ = trained_causal_sae(activation)
    sae.eval()
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(sae.cfg.d_sae, 1) + 0.5)
    x = torch.randn(64, D_MODEL) * 2
    feats, recons = sae.encode(x), sae.decode(sae.encode(x))
    if activation == "relu":  # as SAELens's standard SAE: latents now in unit-decoder units
        feats = feats * sae.W_dec.norm(dim=-1)
    sae.fold_W_dec_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(sae.cfg.d_sae))
    torch.testing.assert_close(sae.encode(x), feats, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(x)), recons, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_error_term_forward_equals_clean_forward(tiny_model, tmp_path, activation):
    trained_causal_sae(activation)[0].save_inference_model(tmp_path)
    sae = SAE.load_from_disk(tmp_path)
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    model = HookedSAETransformer(tiny_model.cfg)
    model.load_state_dict(tiny_model.state_dict())
    tokens = make_tokens(4, seed=5)
    clean = model(tokens)
    model.add_sae(sae, use_error_term=True)
    torch.testing.assert_close(model(tokens), clean, rtol=1e-4, atol=1e-5)
    model.reset_saes()
    model.add_sae(sae, use_error_term=False)
    assert not torch.allclose(model(tokens), clean, atol=1e-3)  # the splice is really there


# 6. config errors: one clear line each
@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"activation": "gelu"}, "is not one of relu, topk, batchtopk"),
        ({"k": 0}, "0 < k <= d_sae"),
        ({"k": 65}, "0 < k <= d_sae"),
        ({"k": 2.5}, "must be a whole number"),
        ({"kl_every": 0}, "kl_every=0 must be >= 1"),
        ({"kl_estimator": "second"}, "must be 'exact' or 'fisher'"),
        ({"fisher_samples": 0}, "fisher_samples=0 must be >= 1"),
        ({"verify_action": "reweight"}, "needs activation='relu'"),
    ],
)
def test_bad_config_gives_a_clear_error(kwargs, needle):
    with pytest.raises(ValueError, match=needle) as err:
        causal_cfg(**kwargs)
    assert "\n" not in str(err.value)


def test_lambda_kl_left_unset_takes_the_estimators_default_and_is_saved_as_a_number():
    """Unset, the KL weight follows ``kl_estimator`` (the second-order form's weight would be
    far too large for the exact term); given, it is kept; either way the config holds a float."""
    from csae_plugin.saes.causal import DEFAULT_LAMBDA_KL

    def cfg(**kw) -> CausalTrainingSAEConfig:
        return CausalTrainingSAEConfig(d_in=D_MODEL, d_sae=64, k=4, **kw)

    assert cfg().lambda_kl == DEFAULT_LAMBDA_KL["fisher"] == 1000.0
    assert cfg(kl_estimator="exact").lambda_kl == DEFAULT_LAMBDA_KL["exact"] == 1.0
    assert cfg(kl_estimator="exact", lambda_kl=4.0).lambda_kl == 4.0
    assert cfg(lambda_kl=0.0).lambda_kl == 0.0
    assert cfg().to_dict()["lambda_kl"] == 1000.0
