"""Why do KL-trained SAEs end with a higher held-out KL than TopK? Three checks on the study's
SAEs (``evals/study.py``), on the embedded Gemma 3 270M.

1. **Same quantity?** The KL term's own function (``spliced_kl``, all positions, no grad) on the
   held-out tokens core scores, against core's ``kl_div_with_sae``, for each SAE. If the term
   measured something other than what core reports, training it could not lower core's number.
2. **Does optimising the term lower held-out KL?** Starting from the study's TopK SAE (seed 0),
   in its training space (activations scaled as SAELens scaled them), Adam (``--lr``; the
   study's 1e-3 makes a KL-only run diverge within 5 steps) on the KL term alone (no MSE), with
   SAELens's gradient clipping, for a few steps: with a low-noise term (4 sequences, all
   positions), the every-step variant's noisy one (1 sequence, 16 positions), and the
   second-order (Fisher) form on 1024-token activation batches. Held-out KL and explained
   variance are tracked.
3. **How the KL gradient compares with the reconstruction gradient** at that point: the norm of
   ``lambda * grad KL`` (the study's setting and the variant's) against the norm of the MSE
   gradient of one 1024-token batch, and the KL estimates' signal-to-noise ratio (cosine of
   independent estimates with each other).

    python evals/kl_diagnosis.py   # about 10 minutes on 2 cores

Writes ``evals/results/kl_diagnosis_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.activation_scaler import ActivationScaler
from sweep import HOOK, PRESETS, machine

from csae_plugin.causal.tail import capture, padding_masks, parse_hook, special_token_mask
from csae_plugin.data import corpus_splits
from csae_plugin.models import load_model
from csae_plugin.saes.loading import load_sae_from_folder
from csae_plugin.training.fisher import fisher_kl, hook_fisher
from csae_plugin.training.kl import spliced_kl

RESULTS = Path(__file__).parent / "results"
STUDY = RESULTS / "study_cpu"
SAES = ["topk_s0", "topkequal_s0", "causal_s0", "causaleverystep_s0"]
SETTINGS = {  # (lambda, sequences, positions) per KL estimate
    "study": (4.0, 4, 16),
    "everystep": (1.0, 1, 16),
    "exact4": (1.0, 4, 0),
}


def core_kl(name: str) -> float:
    path = STUDY / "eval_results" / "core" / f"local_{name}_eval_results.json"
    metrics = json.loads(path.read_text())["eval_result_metrics"]
    return metrics["model_behavior_preservation"]["kl_div_with_sae"]


def held_out(model, plan, sae, scaler, tokens, bos) -> dict[str, float]:
    """KL (the term's function, all positions) and explained variance on ``tokens``."""
    with torch.no_grad():
        kl = spliced_kl(model, plan, sae, tokens, bos, scaler).item()
        _, mask = padding_masks(model, tokens)
        x, _ = capture(model, plan, tokens, mask)
        x = x[special_token_mask(tokens, bos)]
        recon = scaler.unscale(sae.decode(sae.encode(scaler.scale(x))))
        ev = 1 - (x - recon).square().sum() / (x - x.mean(0)).square().sum()
    return {"kl": kl, "explained_variance": ev.item()}


def training_space_topk(folder: Path, scale: float) -> TopKTrainingSAE:
    """The saved TopK SAE as the training SAE it was, in scaled-activation units."""
    sae = load_sae_from_folder(folder)
    train = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae, k=32))
    train.load_state_dict({k: v.clone() for k, v in sae.state_dict().items()}, strict=False)
    train.fold_activation_norm_scaling_factor(1 / scale)  # undo SAELens's fold at save time
    return train


def grads(sae, loss: torch.Tensor) -> torch.Tensor:
    params = [p for p in sae.parameters() if p.requires_grad]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--draws", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-5, help="Adam's for check 2")
    parser.add_argument("--out", type=Path, default=RESULTS / "kl_diagnosis_cpu.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = load_model("gemma-3-270m")
    preset = PRESETS["cpu"]
    splits = corpus_splits(model.tokenizer, 128, seed=0)
    eval_tokens = splits.eval[: preset.n_eval_sequences, : preset.nces_context]
    train_tokens = splits.train
    bos = torch.tensor([model.tokenizer.bos_token_id])
    plan = parse_hook(HOOK)
    result: dict = {"machine": machine(), "hook": HOOK, "eval_tokens": list(eval_tokens.shape)}

    # 1. the term's function against core's number
    same = {}
    for name in SAES:
        sae = load_sae_from_folder(STUDY / "saes" / name)
        ours = held_out(model, plan, sae, ActivationScaler(), eval_tokens, bos)
        same[name] = {"spliced_kl": ours["kl"], "core_kl_div_with_sae": core_kl(name)}
        print(f"[1] {name}: {same[name]}", flush=True)
    result["same_quantity"] = same

    # the scale SAELens trained with: sqrt(d_in) / mean norm of (non-BOS) training activations
    with torch.no_grad():
        _, mask = padding_masks(model, train_tokens[:64])
        x, _ = capture(model, plan, train_tokens[:64], mask)
        x = x[special_token_mask(train_tokens[:64], bos)]
    scale = (x.shape[-1] ** 0.5 / x.norm(dim=-1).mean()).item()
    scaler = ActivationScaler(scaling_factor=scale)
    mse_batch = scaler.scale(x[torch.randperm(x.shape[0])[:1024]])
    result["scaling_factor"] = scale

    # 3. gradient norms and signal-to-noise at the trained TopK SAE
    sae = training_space_topk(STUDY / "saes" / "topk_s0", scale)
    recon = sae.decode(sae.encode(mse_batch))
    g_mse = grads(sae, (recon - mse_batch).square().sum(-1).mean())
    stats = {"mse_grad_norm": g_mse.norm().item()}
    cursor = 0
    for setting, (lam, seqs, positions) in SETTINGS.items():
        draws = []
        for _ in range(args.draws if positions else 2):
            tokens = train_tokens[cursor : cursor + seqs]
            cursor += seqs
            draws.append(
                lam * grads(sae, spliced_kl(model, plan, sae, tokens, bos, scaler, positions))
            )
        norms = torch.stack([d.norm() for d in draws])
        cos = [
            F.cosine_similarity(draws[i], draws[j], dim=0).item()
            for i in range(len(draws))
            for j in range(i + 1, len(draws))
        ]
        stats[setting] = {
            "lambda": lam,
            "sequences": seqs,
            "positions": positions or "all",
            "kl_grad_norm_mean": norms.mean().item(),
            "ratio_to_mse_grad_norm": (norms.mean() / g_mse.norm()).item(),
            "cosine_between_draws_mean": sum(cos) / len(cos),
            "cosine_with_mse_grad_mean": sum(
                F.cosine_similarity(d, g_mse, dim=0).item() for d in draws
            )
            / len(draws),
        }
        print(f"[3] {setting}: {stats[setting]}", flush=True)
    result["gradients_at_topk_s0"] = stats

    # 2. KL alone, optimised from the TopK SAE: the exact term (low / high noise) and its
    # second-order form on batches of 1024 training activations
    fisher = hook_fisher(model, HOOK, train_tokens[64:96], special_ids=bos, samples=2)
    runs = {}
    for setting in ("exact4", "everystep", "fisher"):
        sae = training_space_topk(STUDY / "saes" / "topk_s0", scale)
        opt = torch.optim.Adam(sae.parameters(), lr=args.lr)
        track = [{"step": 0, **held_out(model, plan, sae, scaler, eval_tokens, bos)}]
        t0 = time.perf_counter()
        for step in range(1, args.steps + 1):
            if setting == "fisher":
                batch = scaler.scale(x[torch.randint(0, x.shape[0], (1024,))])
                recon = sae.decode(sae.encode(batch))
                loss = fisher_kl(scaler.unscale(recon) - scaler.unscale(batch), fisher)
            else:
                _, seqs, positions = SETTINGS[setting]
                tokens = train_tokens[torch.randint(0, train_tokens.shape[0], (seqs,))]
                loss = spliced_kl(model, plan, sae, tokens, bos, scaler, positions)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)  # as SAELens's trainer
            opt.step()
            if step % 5 == 0:
                track.append({"step": step, **held_out(model, plan, sae, scaler, eval_tokens, bos)})
                print(f"[2] {setting}: {track[-1]}", flush=True)
        runs[setting] = {"track": track, "seconds": time.perf_counter() - t0}
    result["kl_only_from_topk_s0"] = {"lr": args.lr, "runs": runs}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
