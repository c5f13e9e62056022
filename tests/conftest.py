"""Shared offline fixtures and helpers, imported by the tests as ``from conftest import ...``:
a tiny TransformerLens model and token data built in-process, SAEs on it, and the ``sae_bench``
command's test settings.

The tests mirror the package: ``saes/``, ``training/``, ``causal/`` and ``evals/`` (with
``evals/nces/``) test the subpackages of ``csae_plugin`` of those names, ``repo_evals/`` the
repository's ``evals/`` scripts, and the files here the package as a whole (layout, README,
packaging, the command line, the demo, models, data, a new user's battery, reproducibility).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset
from sae_lens import JumpReLUSAE, StandardSAE, TopKSAE
from transformer_lens import HookedTransformer, HookedTransformerConfig

import csae_plugin  # noqa: F401  (registers "causal")
from csae_plugin import CausalTrainingSAE, CausalTrainingSAEConfig

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
D_MODEL = 32
N_CTX = 16
D_VOCAB = 64
BOS = 1
HOOK = "blocks.0.hook_resid_post"


def make_tiny_model(seed: int = 0, **overrides) -> HookedTransformer:
    """A random 2-layer model (``overrides`` replace its config's fields), in eval mode."""
    cfg = dict(
        n_layers=2,
        d_model=D_MODEL,
        n_heads=4,
        d_head=8,
        d_mlp=64,
        d_vocab=D_VOCAB,
        n_ctx=N_CTX,
        act_fn="gelu",
        normalization_type="LN",
        seed=seed,
        default_prepend_bos=False,
    )
    model = HookedTransformer(HookedTransformerConfig(**(cfg | overrides)))
    model.eval()
    return model


def make_tokens(n_seq: int, seed: int = 0, context: int = N_CTX) -> torch.Tensor:
    """Random tokens with a repeated structure (so the model's outputs vary), BOS first."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, D_VOCAB, (n_seq, context), generator=gen)
    tokens[:, 0] = BOS
    return tokens


def standard_sae(seed: int = 0, d_in: int = D_MODEL, hook: str = HOOK, dead: int | None = None):
    """A random SAELens StandardSAE (64 latents) at ``hook``; latent ``dead`` can never fire."""
    from sae_lens import StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=64, metadata=SAEMetadata(hook_name=hook)))
    if dead is not None:
        with torch.no_grad():
            sae.b_enc[dead] = -1e6
    return sae


ACTIVATIONS = ["relu", "topk", "batchtopk"]
SAVED_AS = {"topk": TopKSAE, "batchtopk": JumpReLUSAE, "relu": StandardSAE}
"""The plain SAELens class a causal SAE of each activation is saved as."""


EXACT_KL = {
    "kl_estimator": "exact",
    "lambda_kl": 1.0,
    "kl_every": 10,
    "kl_batch_size": 4,
    "kl_positions": 0,
    "kl_finetune_fraction": 0.0,
    "kl_dtype": "float32",
}
"""The exact KL every ``kl_every`` steps over the whole run: the setting the causal-SAE tests
count model passes and KL steps against, whatever the config's defaults are."""


def causal_cfg(activation: str = "topk", **kw) -> CausalTrainingSAEConfig:
    """A causal SAE's config for the tiny model: 64 latents, ``k`` 4 and :data:`EXACT_KL`
    unless given."""
    kw = {"k": 4, **EXACT_KL, **kw}
    return CausalTrainingSAEConfig(d_in=D_MODEL, d_sae=64, activation=activation, **kw)


def trained_causal_sae(
    activation: str = "topk", steps: int = 30, seed: int = 0, **kw
) -> tuple[CausalTrainingSAE, torch.optim.Adam]:
    """A causal SAE (``lambda_kl`` 0 unless given) briefly trained on random activations, so its
    weights are not at init, and its Adam (with state)."""
    from sae_lens.saes.sae import TrainStepInput

    torch.manual_seed(seed)
    sae = CausalTrainingSAE(causal_cfg(activation, **{"lambda_kl": 0.0, **kw}))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for step in range(steps):
        x = torch.randn(128, D_MODEL) * 3 + 1
        coefficients = {"l1": 1e-3, "kl": 0.0}
        out = sae.training_forward_pass(TrainStepInput(x, coefficients, None, step, False))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return sae, opt


# the ``sae_bench`` command on the tiny model (with ``tiny_world``): fast settings, SAE folders,
# and its one-line errors
FAST = ["--no-progress", "--device", "cpu", "--context-size", "16", "--latents", "6"]
FAST += ["--null-draws", "3", "--seqs-per-latent", "3", "--n-bootstrap", "50"]


def save_standard(folder, d_in: int = D_MODEL, hook: str = HOOK):
    standard_sae(d_in=d_in, hook=hook).save_model(folder)
    return folder


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sae_bench: error: "), err
    assert "Traceback" not in err
    return lines[0]


def result_files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="session")
def tiny_model() -> HookedTransformer:
    return make_tiny_model()


@pytest.fixture(scope="session")
def tiny_tokens() -> torch.Tensor:
    return make_tokens(256)


@pytest.fixture(scope="session")
def tiny_dataset(tiny_tokens: torch.Tensor) -> Dataset:
    return Dataset.from_dict({"input_ids": tiny_tokens.tolist()})


@pytest.fixture
def tiny_world(monkeypatch) -> list[str]:
    """Route ``sae_bench``'s model and token loading to the tiny model and 12 + 12 token rows
    (it has no tokenizer); the list records the names of the models loaded."""
    from csae_plugin import models
    from csae_plugin.evals import tokens

    loads = []

    def load_model(name, device="cpu", dtype="float32"):
        loads.append(name)
        return make_tiny_model()

    def load_tokens(model, config):
        return make_tokens(12, seed=1), make_tokens(12, seed=2)

    monkeypatch.setattr(models, "load_model", load_model)
    monkeypatch.setattr(tokens, "load_tokens", load_tokens)
    return loads


def runner_config(sae_cfg, output_path=None, training_tokens: int = 16 * 256, seed: int = 0, **kw):
    """A SAELens runner config for the tiny model, offline (no wandb, no hub)."""
    from sae_lens import LanguageModelSAERunnerConfig
    from sae_lens.config import LoggingConfig

    return LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        model_name="tiny",
        hook_name=kw.pop("hook_name", HOOK),
        dataset_path="tiny",
        is_dataset_tokenized=True,
        context_size=N_CTX,
        training_tokens=training_tokens,
        train_batch_size_tokens=64,
        store_batch_size_prompts=8,
        n_batches_in_buffer=4,
        logger=LoggingConfig(log_to_wandb=False),
        output_path=None if output_path is None else str(output_path),
        checkpoint_path=None,
        exclude_special_tokens=[BOS],
        seed=seed,
        **kw,
    )


def save_tiny_gpt2(folder: Path) -> Path:
    """A randomly initialised 2-layer GPT-2 (d_model 32) and a small byte-level BPE tokenizer
    (bos ``<bos>``), saved as a Hugging Face folder; returns the folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<bos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(["The capital of Germany is Berlin."] * 10, trainer=trainer)
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<bos>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(hf_tokenizer),
        n_positions=32,
        n_ctx=32,  # real GPT-2 configs carry it and TransformerLens reads it
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=hf_tokenizer.bos_token_id,
        eos_token_id=hf_tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    hf_tokenizer.save_pretrained(folder)
    return folder
