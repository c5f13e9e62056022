"""Input checks shared by the runner, the evals and the CLI: one clear line per problem."""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer


def activation_shape(model: HookedTransformer, hook_name: str) -> tuple[int, ...]:
    """Shape of one token's activation at ``hook_name`` (from a 2-token forward)."""
    if hook_name not in model.hook_dict:
        layers = model.cfg.n_layers
        raise ValueError(
            f"hook {hook_name!r} is not in the model ({layers} layers, blocks.0-{layers - 1}); "
            f"use a name from model.hook_dict, e.g. 'blocks.{layers // 2}.hook_resid_post'"
        )
    tokens = torch.zeros((1, 2), dtype=torch.long, device=model.cfg.device)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[hook_name])
    return tuple(cache[hook_name].shape[2:])


def check_model_matches_sae(model: HookedTransformer, hook_name: str, d_in: int) -> None:
    """Raise a one-line ValueError if the hook is unknown or its width is not the SAE's d_in."""
    shape = activation_shape(model, hook_name)
    width = int(torch.tensor(shape).prod())
    if width != d_in:
        raise ValueError(
            f"SAE d_in={d_in} does not match the model's activation size {width} at {hook_name!r}; "
            "use an SAE trained on this model and hook, or set d_in to match"
        )
