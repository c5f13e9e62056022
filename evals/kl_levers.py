"""What makes the causal SAE's KL term cheaper, measured on the embedded Gemma 3 270M.

For a trained SAE (``--sae``, default the study's TopK SAE of seed 0), on training sequences:

1. time per KL step (value and gradient) by sequences per step and scored positions per
   sequence (``kl_positions``), and the spread of the subsampled estimate around the full one;
2. the clean side's share of a step (the clean tail and its unembedding): the most that
   caching clean log-probabilities with the activations could save;
3. a vocabulary-truncated KL (the clean distribution's top-m tokens plus one remainder bucket)
   against the exact KL. Its remainder needs the spliced distribution's normaliser, i.e. the
   whole spliced unembedding, so it saves no spliced-side work; its error is what it would cost.

    python evals/kl_levers.py [--sae evals/results/study_cpu/saes/topk_s0]

Writes ``evals/results/kl_levers_cpu.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch
from sweep import HOOK, machine

from csae_plugin.causal.tail import (
    capture,
    logits,
    padding_masks,
    parse_hook,
    run_tail,
    special_token_mask,
)
from csae_plugin.data import corpus_splits
from csae_plugin.models import load_model
from csae_plugin.saes.loading import load_sae
from csae_plugin.training.context import CausalTrainingContext

RESULTS = Path(__file__).parent / "results"


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls (after one untimed call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sae", default=str(RESULTS / "study_cpu" / "saes" / "topk_s0"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "kl_levers_cpu.json")
    args = parser.parse_args(argv)
    model = load_model("gemma-3-270m")
    model.requires_grad_(False)
    sae = load_sae(args.sae)[0]
    tokens = corpus_splits(model.tokenizer, 128, seed=0).train[-64:]  # rows trained on last
    bos = torch.tensor([model.tokenizer.bos_token_id])
    context = CausalTrainingContext(model=model, hook_name=HOOK, next_tokens=None, special_ids=bos)

    def step(batch: torch.Tensor, positions: int) -> torch.Tensor:
        kl = context.spliced_kl(sae, batch, positions)
        kl.backward()
        sae.zero_grad(set_to_none=True)
        return kl.detach()

    timings = []
    for n_seq, positions in ((4, 0), (4, 32), (4, 16), (4, 8), (2, 16), (1, 16)):
        seconds = timed(functools.partial(step, tokens[:n_seq], positions), args.repeats)
        timings.append({"sequences": n_seq, "positions": positions or "all", "seconds": seconds})
        print(f"[kl] {n_seq} seq x {positions or 'all'} positions: {seconds:.2f} s", flush=True)

    # spread of the subsampled estimate on 4 sequences (64 draws) around the full value
    with torch.no_grad():
        full = context.spliced_kl(sae, tokens[:4]).item()
        torch.manual_seed(0)
        spread = {}
        for positions in (32, 16, 8):
            draws = torch.tensor(
                [context.spliced_kl(sae, tokens[:4], positions).item() for _ in range(64)]
            )
            spread[positions] = {
                "mean_over_full": draws.mean().item() / full,
                "relative_sd": draws.std().item() / full,
            }

    # the clean side's share: its tail and unembedding of 4 sequences' scored rows
    plan = parse_hook(HOOK)
    batch = tokens[:4]
    _, attention_mask = padding_masks(model, batch)
    mask = special_token_mask(batch, bos)

    def clean_side() -> None:
        with torch.no_grad():
            x, start = capture(model, plan, batch, attention_mask)
            h = run_tail(model, plan, start, x, attention_mask)[mask]
            logits(model, h).log_softmax(-1)

    clean_seconds = timed(clean_side, args.repeats)

    # vocabulary truncation with a remainder bucket, against the exact KL, per row
    with torch.no_grad():
        x, start = capture(model, plan, batch, attention_mask)
        clean = run_tail(model, plan, start, x, attention_mask)[mask]
        recon = sae.decode(sae.encode(x))
        spliced_x = torch.where(mask[..., None], recon, x)
        spliced = run_tail(model, plan, start, spliced_x, attention_mask)[mask]
        logp = logits(model, clean).log_softmax(-1)
        logq = logits(model, spliced).log_softmax(-1)
        exact = (logp.exp() * (logp - logq)).sum(-1)
        truncation = {}
        for m in (64, 1024, 16384):
            top = logp.topk(m, dim=-1).indices
            p_s, q_s = logp.gather(-1, top).exp(), logq.gather(-1, top).exp()
            p_r = (1 - p_s.sum(-1)).clamp(min=1e-12)
            q_r = (1 - q_s.sum(-1)).clamp(min=1e-12)
            kl_m = (p_s * (p_s.log() - q_s.log())).sum(-1) + p_r * (p_r.log() - q_r.log())
            truncation[m] = {
                "mean_kl_over_exact": kl_m.mean().item() / exact.mean().item(),
                "median_row_relative_error": ((kl_m - exact).abs() / exact).median().item(),
                "clean_mass_outside_top": p_r.mean().item(),
            }
    result = {
        "benchmark": "KL-term levers: positions per sequence, clean-side share, vocabulary "
        "truncation",
        "sae": args.sae,
        "hook": HOOK,
        "d_vocab": int(model.cfg.d_vocab),
        "machine": machine(),
        "step_seconds": timings,
        "subsampled_estimate_4_sequences": {"full_kl": full, "by_positions": spread},
        "clean_side_seconds_4_sequences_all_positions": clean_seconds,
        "clean_side_share_of_full_step": clean_seconds / timings[0]["seconds"],
        "vocabulary_truncation": truncation,
        "exact_mean_kl": exact.mean().item(),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in list(result)[6:]}, indent=2))
    return result


if __name__ == "__main__":
    main()
