"""Reference dictionaries every SAE metric is calibrated against, as plain SAELens SAEs.

A metric that a dictionary of random directions passes measures nothing, so the NCES study
scores these beside the trained SAEs (README, "what exactly is measured"):

* ``random_isotropic``: unit directions u ~ N(0, I);
* ``random_covariance``: unit directions u ~ N(0, Sigma), Sigma the activations' covariance;
* ``random_mixture``: each latent isotropic or covariance-shaped with probability 1/2;
* ``pca``: the activations' principal directions, largest variance first;
* ``identity``: the basis vectors of the hook's space (one latent per dimension);
* ``planted_fisher``: the positive control, the top eigen-directions of the hook's Fisher
  metric (:func:`csae_plugin.training.fisher.hook_fisher`), the directions the model's output
  is most sensitive to per unit norm, so they move it more than random directions shaped like
  them: NCES must find them.

``RANDOM_SHAPES`` holds further random shapes for calibration studies:
``random_sqrt_covariance`` (u ~ N(0, Sigma^1/2), between isotropic and covariance-shaped) and
``random_sparse`` (8 random basis coordinates of the hook's space, Gaussian values),
``random_heavy_tailed`` (i.i.d. Student-t coordinates, 2 degrees of freedom: a few coordinates
carry most of the energy) and ``random_activations`` (centred activation vectors drawn from
``acts``: the data's own directions, beyond their second moments).

Each is a JumpReLU SAE with encoder = decoder transposed and ``b_dec`` = the activations' mean:
latent i reads the projection of x - mean on its direction and fires, with that value, on the
``firing_rate`` fraction of reference tokens where the projection is largest (threshold = that
quantile). Decoder rows are unit-norm, so SAEBench's checks pass and decode is linear.
"""

from __future__ import annotations

from pathlib import Path

import torch
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.sae import SAEMetadata
from transformer_lens import HookedTransformer

from csae_plugin.causal.tail import activations_at, check_hook_exists
from csae_plugin.training.fisher import hook_fisher

REFERENCE_KINDS = (
    "random_isotropic",
    "random_covariance",
    "random_mixture",
    "pca",
    "identity",
    "planted_fisher",
)
"""Every reference dictionary kind (the demo scores ``csae_plugin.demo.DEMO_REFERENCES`` by
default, ``--references`` any of these)."""

RANDOM_SHAPES = (
    "random_sqrt_covariance",
    "random_sparse",
    "random_heavy_tailed",
    "random_activations",
)
"""Random dictionaries of other shapes, for calibration (not in the demo)."""

SPARSE_COORDINATES = 8
"""Non-zero basis coordinates of each ``random_sparse`` direction."""

INDEPENDENT_SEED_OFFSET = 1_000_003
"""Seed offset of an independent encoder's random directions (never the decoder's seed)."""

PLANTED_LATENTS = 16
"""Latents of the planted dictionary :func:`save_reference_saes` builds: the top 16 Fisher
directions (further down the spectrum the output is less sensitive, and at the bottom less than
to random directions: those would not be a positive control)."""

FISHER_SEQUENCES = 16
"""Token rows :func:`save_reference_saes` estimates the hook's Fisher metric on."""


def hook_activations(
    model: HookedTransformer,
    hook_name: str,
    tokens: torch.Tensor,
    *,
    batch_size: int = 8,
    bos_token_id: int | None = None,
) -> torch.Tensor:
    """Activations at ``hook_name`` for ``tokens`` [n, T], BOS and padding left out [N, d_in]."""
    check_hook_exists(model, hook_name)
    tokenizer = model.tokenizer
    bos = bos_token_id if bos_token_id is not None else getattr(tokenizer, "bos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    out = []
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start : start + batch_size].to(model.cfg.device)
            x = activations_at(model, hook_name, batch).reshape(*batch.shape, -1)
            keep = torch.ones_like(batch, dtype=torch.bool)
            if pad is not None and pad != bos:
                keep &= batch != pad
            if bos is not None:
                keep[:, 0] &= batch[:, 0] != bos
            out.append(x[keep].float().cpu())
    acts = torch.cat(out)
    if acts.shape[0] < 2:
        raise ValueError("need at least 2 non-BOS, non-pad tokens to build a reference SAE")
    return acts


def reference_directions(
    kind: str,
    acts: torch.Tensor,
    d_sae: int | None = None,
    seed: int = 0,
    fisher: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unit directions [d_sae, d_in] of reference dictionary ``kind`` for activations ``acts``.

    ``d_sae`` defaults to d_in; ``pca``, ``identity`` and ``planted_fisher`` have at most d_in
    latents; ``planted_fisher`` needs ``fisher`` [d_in, d_in], the hook's Fisher metric.
    """
    if kind not in REFERENCE_KINDS + RANDOM_SHAPES:
        raise ValueError(
            f"unknown reference SAE {kind!r}; choose one of {REFERENCE_KINDS + RANDOM_SHAPES}"
        )
    d_in = acts.shape[1]
    n = d_in if d_sae is None else d_sae
    if kind in ("pca", "identity", "planted_fisher") and n > d_in:
        raise ValueError(f"a {kind} dictionary has at most d_in={d_in} latents, not {n}")
    gen = torch.Generator().manual_seed(seed)
    x = acts.double()
    cov = torch.cov(x.T)
    eigvals, eigvecs = torch.linalg.eigh((cov + cov.T) / 2)
    eigvals = eigvals.clamp(min=0)
    if kind == "identity":
        dirs = torch.eye(d_in, dtype=torch.float64)[:n]
    elif kind == "pca":
        dirs = eigvecs.flip(1).T[:n]
    elif kind == "planted_fisher":
        if fisher is None or fisher.shape != (d_in, d_in):
            raise ValueError("a planted_fisher dictionary needs the hook's [d_in, d_in] Fisher")
        f = fisher.double().cpu()
        dirs = torch.linalg.eigh((f + f.T) / 2)[1].flip(1).T[:n]
    elif kind == "random_sparse":
        dirs = torch.zeros(n, d_in, dtype=torch.float64)
        for row in dirs:
            where = torch.randperm(d_in, generator=gen)[:SPARSE_COORDINATES]
            row[where] = torch.randn(len(where), generator=gen, dtype=torch.float64)
    elif kind == "random_heavy_tailed":
        normal = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
        chi2 = torch.randn(n, d_in, 2, generator=gen, dtype=torch.float64).pow(2).sum(-1)
        dirs = normal / (chi2 / 2).sqrt()  # Student-t, 2 degrees of freedom
    elif kind == "random_activations":
        rows = torch.randint(len(x), (n,), generator=gen)
        dirs = x[rows] - x.mean(0)
    else:
        isotropic = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
        shaped = (isotropic * eigvals.sqrt()) @ eigvecs.T
        if kind == "random_isotropic":
            dirs = isotropic
        elif kind == "random_covariance":
            dirs = shaped
        elif kind == "random_sqrt_covariance":
            dirs = (isotropic * eigvals.sqrt().sqrt()) @ eigvecs.T
        else:
            coin = torch.rand(n, 1, generator=gen, dtype=torch.float64) < 0.5
            dirs = torch.where(coin, isotropic, shaped)
    return (dirs / dirs.norm(dim=1, keepdim=True)).float()


def reference_sae(
    kind: str,
    acts: torch.Tensor,
    hook_name: str,
    *,
    d_sae: int | None = None,
    firing_rate: float = 0.02,
    seed: int = 0,
    model_name: str | None = None,
    fisher: torch.Tensor | None = None,
    encoder: str = "tied",
) -> JumpReLUSAE:
    """Reference dictionary ``kind`` (:data:`REFERENCE_KINDS`, :data:`RANDOM_SHAPES`) on
    activations ``acts`` [N, d_in] (``fisher``: the hook's Fisher metric, for
    ``planted_fisher``).

    ``encoder="tied"``: latent i reads its own decoder direction. ``"independent"`` (random
    kinds only): it reads another random direction of the same shape, so where and how much it
    fires tells nothing about its decoder direction, which is then distributed exactly like its
    own null draws given the positions and sizes the null holds fixed: the dictionary NCES must
    score at its null value. (A tied random latent fires where the activations are extreme
    along its direction, and zero-ablating that component is not a random kick.)
    """
    if not 0 < firing_rate < 1:
        raise ValueError(f"firing_rate must be in (0, 1), got {firing_rate}")
    if encoder not in ("tied", "independent"):
        raise ValueError(f"encoder must be 'tied' or 'independent', not {encoder!r}")
    if encoder == "independent" and not kind.startswith("random"):
        raise ValueError(f"an independent encoder is for random dictionaries, not {kind!r}")
    dirs = reference_directions(kind, acts, d_sae, seed, fisher)
    reads = dirs
    if encoder == "independent":
        reads = reference_directions(kind, acts, d_sae, seed + INDEPENDENT_SEED_OFFSET, fisher)
    mean = acts.mean(0)
    projections = (acts - mean) @ reads.T
    threshold = torch.quantile(projections, 1 - firing_rate, dim=0).clamp(min=0)
    meta = SAEMetadata(hook_name=hook_name, model_name=model_name, sae_id=f"reference_{kind}")
    cfg = JumpReLUSAEConfig(d_in=acts.shape[1], d_sae=dirs.shape[0], metadata=meta)
    sae = JumpReLUSAE(cfg)
    with torch.no_grad():
        sae.W_dec.copy_(dirs)
        sae.W_enc.copy_(reads.T)
        sae.b_dec.copy_(mean)
        sae.b_enc.zero_()
        sae.threshold.copy_(threshold)
    return sae.eval()


def save_reference_saes(
    model: HookedTransformer,
    hook_name: str,
    tokens: torch.Tensor,
    folder: str | Path,
    *,
    d_sae: int | None = None,
    kinds: tuple[str, ...] = REFERENCE_KINDS,
    seed: int = 0,
    bos_token_id: int | None = None,
    random_encoder: str = "independent",
) -> list[Path]:
    """Build each reference dictionary of ``kinds`` on ``tokens`` and save it (SAELens layout)
    as ``<folder>/reference_<kind>`` unless already saved; the folders, in ``kinds``' order.

    Random dictionaries get ``d_sae`` latents (default d_in) and ``random_encoder``
    (:func:`reference_sae`; ``independent`` by default, so they show what NCES gives a
    dictionary with no causal structure beyond its null's); PCA and identity have d_in, the
    planted one :data:`PLANTED_LATENTS`.
    """
    root = Path(folder)
    folders = [root / f"reference_{kind.replace('_', '-')}" for kind in kinds]
    if all(f.joinpath("cfg.json").is_file() for f in folders):
        return folders
    acts = hook_activations(model, hook_name, tokens, bos_token_id=bos_token_id)
    name = model.cfg.model_name
    fisher = None
    if "planted_fisher" in kinds:
        fisher = reference_fisher(model, hook_name, tokens, bos_token_id=bos_token_id)
    for kind, target in zip(kinds, folders, strict=True):
        width = d_sae if kind.startswith("random") else None
        if kind == "planted_fisher":  # the top directions only: the rest are not planted
            width = min(PLANTED_LATENTS, acts.shape[1])
        sae = reference_sae(
            kind,
            acts,
            hook_name,
            d_sae=width,
            seed=seed,
            model_name=name,
            fisher=fisher,
            encoder=random_encoder if kind.startswith("random") else "tied",
        )
        sae.save_model(target)
    return folders


def reference_fisher(
    model: HookedTransformer,
    hook_name: str,
    tokens: torch.Tensor,
    *,
    bos_token_id: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """The hook's Fisher metric on the first :data:`FISHER_SEQUENCES` rows of ``tokens``."""
    bos = (
        bos_token_id if bos_token_id is not None else getattr(model.tokenizer, "bos_token_id", None)
    )
    special = None if bos is None else torch.tensor([bos])
    return hook_fisher(
        model, hook_name, tokens[:FISHER_SEQUENCES], special_ids=special, seed=seed, progress=False
    )
