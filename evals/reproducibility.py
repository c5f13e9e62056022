"""Same seed, same machine, two processes: are the trained SAEs and the eval results identical?

    python evals/reproducibility.py OUT_A && python evals/reproducibility.py OUT_B
    python evals/reproducibility.py --compare OUT_A OUT_B

One pass on the embedded Gemma 3 270M (layer 6): train a causal SAE (KL term every 2 steps) and
a TopK SAE (512 latents, k 32, 12 steps of 1024 tokens), run ``core`` and ``nces`` on both, and
write the SHA-256 of each weights file and of each result JSON (eval id and timestamp removed)
to OUT/hashes.json. Run two passes one after the other: two Gemma evals at once need more than
24 GB. ``--eval-only FOLDER...`` reruns only the evals on existing SAE folders.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

HOOK = "blocks.6.hook_resid_post"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def run(out: Path, eval_only: list[str] | None) -> dict:
    import csae_plugin  # noqa: F401
    from csae_plugin.data import corpus_splits
    from csae_plugin.evals.api import evaluate_saes
    from csae_plugin.models import load_model
    from csae_plugin.training import TrainSpec, train_sae

    started = time.time()
    model = load_model("gemma-3-270m")
    splits = corpus_splits(model.tokenizer, 128, seed=0)
    hashes: dict[str, str] = {}
    folders = [Path(f) for f in eval_only or []]
    if not folders:
        bos = model.tokenizer.bos_token_id
        for spec in [TrainSpec("causal", 512, 32, {"kl_every": 2}), TrainSpec("topk", 512, 32)]:
            folder = out / spec.name
            train_sae(
                model,
                HOOK,
                splits.train,
                spec,
                training_tokens=12 * 1024,
                output_path=folder,
                seed=0,
                exclude_special_tokens=[bos],
            )
            hashes[f"{spec.name}/sae_weights"] = _digest(
                (folder / "sae_weights.safetensors").read_bytes()
            )
            folders.append(folder)
    evaluate_saes(
        ["core", "nces"],
        [str(f) for f in folders],
        model=model,
        eval_tokens=splits.eval[:16, :64],
        reference_tokens=splits.train[:16, :64],
        output_dir=out / "eval_results",
        progress=False,
        nces_overrides={"latents": 8, "null_draws": 3, "seqs_per_latent": 3},
    )
    for path in sorted((out / "eval_results").rglob("*.json")):
        payload = json.loads(path.read_text())
        payload.pop("eval_id")
        payload.pop("datetime_epoch_millis")
        key = f"{path.parent.name}/{path.name}"
        hashes[key] = _digest(json.dumps(payload, sort_keys=True).encode())
    result = {"hashes": hashes, "seconds": time.time() - started}
    (out / "hashes.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, nargs="+")
    parser.add_argument("--compare", action="store_true", help="compare two passes' hashes")
    parser.add_argument("--eval-only", nargs="+", default=None, help="SAE folders to re-score")
    args = parser.parse_args(argv)
    if args.compare:
        a, b = (json.loads((p / "hashes.json").read_text())["hashes"] for p in args.out)
        differ = sorted(k for k in a.keys() & b.keys() if a[k] != b[k])
        print(f"{len(a.keys() & b.keys())} files compared; differing: {differ or 'none'}")
        return 1 if differ else 0
    run(args.out[0], args.eval_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
