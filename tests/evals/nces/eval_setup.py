"""The NCES eval on the tiny model, for the tests beside this file: a small config and
``run_eval`` on conftest's model and token rows."""

from __future__ import annotations

from conftest import make_tiny_model, make_tokens

from csae_plugin.evals.nces import main as nces_main
from csae_plugin.evals.nces.eval_config import NCESEvalConfig


def tiny_config(**overrides) -> NCESEvalConfig:
    values = dict(
        model_name="tiny",
        context_size=16,
        latents=[0, 3, 5, 9, 17, 40],
        null_draws=3,
        seqs_per_latent=4,
        n_bootstrap=50,
    )
    return NCESEvalConfig(**(values | overrides))


def run(tmp_path, sae, config=None, **kwargs):
    """``run_eval`` of ``sae`` (as release ``tiny/release``) writing to ``tmp_path``."""
    return nces_main.run_eval(
        config or tiny_config(),
        [("tiny/release", sae)],
        "cpu",
        str(tmp_path),
        model=kwargs.pop("model", make_tiny_model()),
        eval_tokens=kwargs.pop("eval_tokens", make_tokens(12, seed=1)),
        reference_tokens=kwargs.pop("reference_tokens", make_tokens(12, seed=2)),
        **kwargs,
    )
