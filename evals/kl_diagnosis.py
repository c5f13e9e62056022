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
4. **Do the estimates point downhill for the held-out KL?** The cosine of each estimate (the
   exact term at the three settings, its second-order form, the MSE gradient, and the exact
   term on 32 training sequences) with the gradient of the held-out KL itself.

    python evals/kl_diagnosis.py [--parts 1,2,3,4]   # about 15 minutes on 2 cores

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


class Setup:
    """The model, tokens and the study's TopK SAE in training space, loaded once."""

    def __init__(self) -> None:
        self.model = load_model("gemma-3-270m")
        preset = PRESETS["cpu"]
        splits = corpus_splits(self.model.tokenizer, 128, seed=0)
        self.eval_tokens = splits.eval[: preset.n_eval_sequences, : preset.nces_context]
        self.train_tokens = splits.train
        self.bos = torch.tensor([self.model.tokenizer.bos_token_id])
        self.plan = parse_hook(HOOK)
        # the scale SAELens trained with: sqrt(d_in) / mean norm of (non-BOS) activations
        rows = self.train_tokens[:64]
        with torch.no_grad():
            _, mask = padding_masks(self.model, rows)
            x, _ = capture(self.model, self.plan, rows, mask)
        self.x = x[special_token_mask(rows, self.bos)]
        self.scale = (self.x.shape[-1] ** 0.5 / self.x.norm(dim=-1).mean()).item()
        self.scaler = ActivationScaler(scaling_factor=self.scale)
        path = STUDY / "cache" / "fisher_train_rows_64-96.pt"  # beside the ignored cache
        if path.is_file():
            self.fisher = torch.load(path)
        else:
            self.fisher = hook_fisher(
                self.model, HOOK, self.train_tokens[64:96], special_ids=self.bos, samples=2
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.fisher, path)
        self.cursor = 128  # training rows handed out so far (0-127 are used above)

    def topk(self) -> TopKTrainingSAE:
        return training_space_topk(STUDY / "saes" / "topk_s0", self.scale)

    def next_rows(self, n: int) -> torch.Tensor:
        rows = self.train_tokens[self.cursor : self.cursor + n]
        self.cursor += n
        return rows

    def kl(self, sae, tokens: torch.Tensor, positions: int = 0) -> torch.Tensor:
        return spliced_kl(self.model, self.plan, sae, tokens, self.bos, self.scaler, positions)

    def fisher_kl(self, sae) -> torch.Tensor:
        batch = self.scaler.scale(self.x[torch.randint(0, self.x.shape[0], (1024,))])
        recon = sae.decode(sae.encode(batch))
        return fisher_kl(self.scaler.unscale(recon) - self.scaler.unscale(batch), self.fisher)

    def mse(self, sae) -> torch.Tensor:
        batch = self.scaler.scale(self.x[torch.randint(0, self.x.shape[0], (1024,))])
        return (sae.decode(sae.encode(batch)) - batch).square().sum(-1).mean()

    def held_out(self, sae) -> dict[str, float]:
        return held_out(self.model, self.plan, sae, self.scaler, self.eval_tokens, self.bos)


def same_quantity(s: Setup) -> dict:
    """1. The term's function on core's tokens against core's number."""
    same = {}
    for name in SAES:
        sae = load_sae_from_folder(STUDY / "saes" / name)
        ours = held_out(s.model, s.plan, sae, ActivationScaler(), s.eval_tokens, s.bos)
        same[name] = {"spliced_kl": ours["kl"], "core_kl_div_with_sae": core_kl(name)}
        print(f"[1] {name}: {same[name]}", flush=True)
    return same


def cosines(draws: list[torch.Tensor]) -> float:
    pairs = [
        F.cosine_similarity(draws[i], draws[j], dim=0).item()
        for i in range(len(draws))
        for j in range(i + 1, len(draws))
    ]
    return sum(pairs) / len(pairs)


def gradient_noise(s: Setup, n_draws: int) -> dict:
    """3. Norms and signal-to-noise of the KL gradient estimates at the TopK SAE."""
    sae = s.topk()
    mse_draws = [grads(sae, s.mse(sae)) for _ in range(n_draws)]
    mse_norm = torch.stack([d.norm() for d in mse_draws]).mean()
    g_mse = torch.stack(mse_draws).mean(0)
    stats: dict = {
        "mse_1024_tokens": {
            "grad_norm_mean": mse_norm.item(),
            "grad_norm_range": [
                min(d.norm().item() for d in mse_draws),
                max(d.norm().item() for d in mse_draws),
            ],
            "cosine_between_draws_mean": cosines(mse_draws),
        }
    }
    for setting, (lam, seqs, positions) in SETTINGS.items():
        draws = [
            lam * grads(sae, s.kl(sae, s.next_rows(seqs), positions))
            for _ in range(n_draws if positions else 2)
        ]
        norms = torch.stack([d.norm() for d in draws])
        stats[setting] = {
            "lambda": lam,
            "sequences": seqs,
            "positions": positions or "all",
            "kl_grad_norm_mean": norms.mean().item(),
            "ratio_to_mse_grad_norm": (norms.mean() / mse_norm).item(),
            "cosine_between_draws_mean": cosines(draws),
            "cosine_with_mse_grad_mean": sum(
                F.cosine_similarity(d, g_mse, dim=0).item() for d in draws
            )
            / len(draws),
        }
        print(f"[3] {setting}: {stats[setting]}", flush=True)
    return stats


def kl_only(s: Setup, steps: int, lr: float) -> dict:
    """2. Adam on the KL term alone from the TopK SAE, held-out KL every 5 steps."""
    runs = {}
    for setting in ("exact4", "everystep", "fisher"):
        sae = s.topk()
        opt = torch.optim.Adam(sae.parameters(), lr=lr)
        track = [{"step": 0, **s.held_out(sae)}]
        t0 = time.perf_counter()
        for step in range(1, steps + 1):
            if setting == "fisher":
                loss = s.fisher_kl(sae)
            else:
                _, seqs, positions = SETTINGS[setting]
                rows = torch.randint(0, s.train_tokens.shape[0], (seqs,))
                loss = s.kl(sae, s.train_tokens[rows], positions)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)  # as SAELens's trainer
            opt.step()
            if step % 5 == 0:
                track.append({"step": step, **s.held_out(sae)})
                print(f"[2] {setting}: {track[-1]}", flush=True)
        runs[setting] = {"track": track, "seconds": time.perf_counter() - t0}
    return {"lr": lr, "runs": runs}


def downhill(s: Setup, n_draws: int) -> dict:
    """4. Cosine of each gradient estimate with the held-out KL's own gradient."""
    sae = s.topk()
    target = grads(sae, s.kl(sae, s.eval_tokens))
    estimates = {
        "exact_32_sequences_all_positions": [grads(sae, s.kl(sae, s.next_rows(32)))],
        "mse_1024_tokens": [grads(sae, s.mse(sae)) for _ in range(2)],
        "fisher_1024_tokens": [grads(sae, s.fisher_kl(sae)) for _ in range(2)],
    }
    for setting, (_, seqs, positions) in SETTINGS.items():
        estimates[setting] = [
            grads(sae, s.kl(sae, s.next_rows(seqs), positions))
            for _ in range(n_draws if positions else 2)
        ]
    out = {}
    for name, draws in estimates.items():
        # a descent direction of the held-out KL has a positive cosine with its gradient
        cos = [F.cosine_similarity(d, target, dim=0).item() for d in draws]
        out[name] = {"cosine_with_heldout_kl_grad_mean": sum(cos) / len(cos), "draws": len(cos)}
        if len(draws) > 1:
            out[name]["cosine_between_draws_mean"] = cosines(draws)
        print(f"[4] {name}: {out[name]}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--draws", type=int, default=6)
    parser.add_argument("--lr", type=float, default=2e-5, help="Adam's for check 2")
    parser.add_argument("--parts", default="1,2,3,4", help="which checks (merged into --out)")
    parser.add_argument("--out", type=Path, default=RESULTS / "kl_diagnosis_cpu.json")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    torch.manual_seed(0)
    s = Setup()
    result: dict = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result.update({"machine": machine(), "hook": HOOK, "eval_tokens": list(s.eval_tokens.shape)})
    result["scaling_factor"] = s.scale
    if "1" in parts:
        result["same_quantity"] = same_quantity(s)
    if "3" in parts:
        result["gradients_at_topk_s0"] = gradient_noise(s, args.draws)
    if "2" in parts:
        result["kl_only_from_topk_s0"] = kl_only(s, args.steps, args.lr)
    if "4" in parts:
        result["cosine_with_heldout_kl_gradient"] = downhill(s, args.draws)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
