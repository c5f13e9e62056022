"""Would the screen's second-order prediction cut NCES's null variance? (a control variate)

    python -m evals.benchmarks.nces_control_variate      # tiny model, ~1 min

For each latent the exact engine gives every null direction's log effect on every sequence; the
second-order screen (:mod:`csae_plugin.causal.screen`) predicts the same effect from the Fisher
quadratic form, 1/2 mean_samples ((v_s . u) ||d||)^2 / n_scored, v_s = sum_t c_t g_t, with the
same directions u, sequences and intervened positions. A control variate subtracts beta x
(prediction - its known mean over random directions) from each null score L_k, so it removes
the part of the null directions' differences the prediction explains: the within-latent
correlation rho between L_k and the predicted score P_k over the K draws. Measured here: rho,
and the variance of the prediction test's statistic it would save, rho^2 / (K + 1): the control
variate sharpens the null's *mean* (the 1/K term of the prediction variance), not the spread
of random directions the latent is compared with, which is the null itself.
Results: ``evals/results/adaptive_power/control_variate.json``.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from csae_plugin import causal as iv
from csae_plugin.causal.inputs import capture_rows, prepare_inputs
from csae_plugin.causal.interventions import latent_null_directions
from csae_plugin.causal.nces import LOG_RATIO_FLOOR
from csae_plugin.causal.screen import _changes, sampled_gradients
from csae_plugin.causal.tail import encode
from evals.common import RESULTS, TINY_HOOK, data_initialised_topk, machine, tiny_setup, write_json


def predicted(setup, stats, effects, samples: int, seed: int) -> np.ndarray:
    """The screen's prediction of every null copy's effect [n_latents, n_seq, K]."""
    out = np.full(effects.null_per_draw.shape, np.nan)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.as_tensor(effects.latents)
    directions = iv.decoder_directions(setup.sae, ids)
    for li, latent in enumerate(effects.latents):
        nulls = latent_null_directions(
            stats, int(latent), effects.null_draws, seed, effects.nulls[0], directions[li]
        )
        u = directions[li].norm() * nulls  # [K, d_in], as the engine scales them
        for j, row in enumerate(effects.sequences[li]):
            if row < 0:
                continue
            rows = torch.tensor([int(row)])
            with torch.no_grad():
                x, start_input = capture_rows(setup, rows)
                f = encode(setup.sae, x).float()
            valid = setup.valid[rows]
            change, first = _changes(effects.intervention, f, valid, stats, 1.0)
            c = change[0, :, latent]  # [T]
            n_scored = int((valid[0] & (torch.arange(f.shape[1]) >= first[0, latent])).sum())
            quad = torch.zeros(len(u), dtype=torch.float64)
            for g in sampled_gradients(setup, x, start_input, rows, samples, generator):
                v = (c[:, None] * g[0]).sum(0)  # [d_in]
                quad += ((u @ v.detach()) ** 2).double()
            out[li, j] = (0.5 * quad / samples / max(n_scored, 1)).detach().numpy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latents", type=int, default=16)
    parser.add_argument("--seqs", type=int, default=8)
    parser.add_argument("--draws", type=int, default=16)
    parser.add_argument("--samples", type=int, default=16, help="label samples of the screen")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model, train, held_out, bos = tiny_setup(32)
    sae = data_initialised_topk(model, TINY_HOOK, train[:32], d_sae=256, k=8, seed=args.seed)
    stats = iv.reference_stats(model, sae, train[:64], bos_token_id=bos, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    latents = np.sort(rng.choice(sae.cfg.d_sae, args.latents, replace=False))
    effects = iv.latent_effects(
        model,
        sae,
        held_out,
        latents,
        stats,
        null_draws=args.draws,
        seqs_per_latent=args.seqs,
        seed=args.seed,
        bos_token_id=bos,
        progress=False,
    )
    setup = prepare_inputs(model, sae, held_out, bos)
    prediction = predicted(setup, stats, effects, args.samples, args.seed)
    exact = np.nanmean(np.log(effects.null_per_draw + LOG_RATIO_FLOOR), axis=1)  # L_k [n, K]
    guess = np.nanmean(np.log(prediction + LOG_RATIO_FLOOR), axis=1)  # P_k [n, K]
    live = np.isfinite(exact).all(1) & np.isfinite(guess).all(1)
    exact_c = exact[live] - exact[live].mean(1, keepdims=True)
    guess_c = guess[live] - guess[live].mean(1, keepdims=True)
    rho = float((exact_c * guess_c).sum() / np.sqrt((exact_c**2).sum() * (guess_c**2).sum()))
    per_latent = [float(np.corrcoef(e, g)[0, 1]) for e, g in zip(exact_c, guess_c, strict=True)]
    k = args.draws
    result = {
        "benchmark": "screen prediction as a control variate of NCES's null scores",
        "machine": machine(),
        "settings": vars(args) | {"model": "evals.common.tiny_setup (random 3-layer)"},
        "latents_scored": int(live.sum()),
        "within_latent_correlation": rho,
        "per_latent_correlation_median": float(np.median(per_latent)),
        "null_score_variance_explained": rho**2,
        "test_variance_saved_at_K8": rho**2 / 9,
        f"test_variance_saved_at_K{k}": rho**2 / (k + 1),
    }
    write_json(RESULTS / "adaptive_power" / "control_variate.json", result)
    print(result)


if __name__ == "__main__":
    main()
