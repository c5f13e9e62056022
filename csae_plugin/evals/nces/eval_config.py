"""Configuration of the NCES eval (SAEBench layout: a pydantic dataclass, every field titled)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic.dataclasses import dataclass
from sae_bench.evals.base_eval_output import BaseEvalConfig

from csae_plugin.causal import DEFAULT_NULL, NULLS, check_nulls
from csae_plugin.causal.nces import DEFAULT_DEFINITION

EMBEDDED_DATASET = "stdlib-docs"
"""``dataset`` value naming the embedded corpus (the Python stdlib's documentation)."""


@dataclass
class NCESEvalConfig(BaseEvalConfig):
    model_name: str = Field(
        default="gemma-3-270m",
        title="Model Name",
        description="Model the SAE reads from: 'gemma-3-270m' (embedded, offline), a local "
        "Hugging Face model folder, or a TransformerLens model name from the hub",
    )
    llm_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32",
        title="LLM Data Type",
        description="Data type the model runs in (as SAEBench's llm_dtype); with bfloat16 / "
        "float16 the perturbations are added to the captured activations in float32 and the "
        "KL is reduced from float32 logits",
    )
    dataset: str = Field(
        default=EMBEDDED_DATASET,
        title="Dataset",
        description="Text to evaluate on: 'stdlib-docs' (the embedded Python documentation) "
        "or a Hugging Face dataset name or local data file; evaluation sequences come from "
        "its held-out split, never from the SAE training split",
    )
    context_size: int = Field(
        default=128,
        ge=2,
        title="Context Length",
        description="Tokens per sequence, BOS included",
    )
    n_eval_sequences: int = Field(
        default=256,
        ge=1,
        title="Evaluation Sequences",
        description="Held-out sequences in which latents are intervened on and scored",
    )
    n_reference_sequences: int = Field(
        default=128,
        ge=1,
        title="Reference Sequences",
        description="Sequences for the activation covariance of the null and the latents' "
        "mean, maximum and resample values (from the training split)",
    )
    intervention: Literal["zero", "mean", "resample", "steer"] = Field(
        default="zero",
        title="Intervention",
        description="How the latent is changed where it fires: to zero, to its reference "
        "mean, to a resampled reference value, or steered up by steer_alpha x its maximum",
    )
    steer_alpha: float = Field(
        default=1.0,
        title="Steer Alpha",
        description="Multiple of the latent's maximum reference activation added by 'steer'",
    )
    null: str = Field(
        default=DEFAULT_NULL,
        title="Null",
        description="Random directions the latent is compared with: 'matched' (the latent's "
        "own energy in each band of the activations' covariance spectrum, a random direction "
        "within each band; the calibrated default), 'matched_eigen' (0.2.0's matched null: "
        "its energy per principal direction, randomly rescaled), 'covariance' "
        "(u ~ N(0, Sigma)) or 'isotropic' (u ~ N(0, I)); several comma-separated, each scored "
        "on its own, the first giving the headline metrics",
    )
    nces_definition: Literal["0.4.0", "0.3.0", "0.2.0"] = Field(
        default=DEFAULT_DEFINITION,
        title="NCES Definition",
        description="'0.4.0': NCES is the latent's geometric-mean effect over its null "
        "directions' (unbiased at 1 for random directions), tested against their spread, and "
        "'matched' gives a latent concentrated on few coordinates its own coordinates permuted "
        "as null; '0.3.0': the same with 'matched' the band null for every latent; "
        "'0.2.0': the earlier ratio of summed effects, with 'matched' meaning 'matched_eigen', "
        "to compare with results of csae-plugin 0.2",
    )
    null_draws: int = Field(
        default=8,
        ge=2,
        title="Null Draws",
        description="Random directions per latent and null (K, at least 2: the significance "
        "test compares the latent with the spread of its null directions)",
    )
    seqs_per_latent: int = Field(
        default=16,
        ge=1,
        title="Sequences per Latent",
        description="Most evaluation sequences (those where the latent fires) per latent",
    )
    adaptive: bool = Field(
        default=False,
        title="Adaptive Second Round",
        description="Give every latent still undecided after the first round (seqs_per_latent "
        "x null_draws; its p-value at most adaptive_futility under some null) a second round "
        "up to adaptive_seqs_per_latent x adaptive_null_draws, new null draws included, and "
        "test it on all its data; a latent clearly null after round 1 stops there. Only "
        "removes verdicts relative to giving every latent the second round, so the error rate "
        "is kept (docs/nces.md, 'Adaptive second round'); per-SAE estimates stay round 1's",
    )
    adaptive_futility: float = Field(
        default=0.05,
        gt=0.0,
        lt=1.0,
        title="Adaptive Futility p-value",
        description="Round-1 p-value above which a latent stops (clearly null) with adaptive; "
        "at least fdr_level",
    )
    adaptive_seqs_per_latent: int = Field(
        default=64,
        ge=1,
        title="Adaptive Sequences per Latent",
        description="Most sequences per latent in all (round 1's included) for a latent that "
        "gets the second round; at least seqs_per_latent",
    )
    adaptive_null_draws: int = Field(
        default=16,
        ge=2,
        title="Adaptive Null Draws",
        description="Null draws per latent and null in all (round 1's included) for a latent "
        "that gets the second round; at least null_draws",
    )
    latents: str | int | list[int] = Field(
        default="auto",
        title="Latents",
        description="Latents to evaluate exactly: 'all'; a count (a random subset drawn with "
        "random_seed); a list of indices ('3,17,42' or '[3]' on the command line); "
        "'screen:N' (N latents drawn evenly across the second-order screen's range; the screen "
        "scores every latent and is reported too); 'auto': all up to 512 latents, else "
        "screen:256",
    )
    screen_sequences: int = Field(
        default=24,
        ge=1,
        title="Screen Sequences",
        description="Evaluation sequences the second-order screen reads (with 'screen:N')",
    )
    screen_samples: int = Field(
        default=8,
        ge=1,
        title="Screen Samples",
        description="Label samples (backward passes per batch) of the second-order screen",
    )
    llm_batch_size: int = Field(
        default=16,
        ge=1,
        title="LLM Batch Size",
        description="Sequences per forward pass when collecting reference statistics",
    )
    copy_batch_size: int = Field(
        default=32,
        ge=1,
        title="Copy Batch Size",
        description="Intervened sequence copies per forward pass of the model's tail",
    )
    latents_per_chunk: int = Field(
        default=128,
        ge=1,
        title="Latents per Chunk",
        description="Latents computed and kept together: a rerun resumes from the finished "
        "chunks, and torchrun's processes share them out",
    )
    memory_budget_mb: int | None = Field(
        default=None,
        ge=1,
        title="Memory Budget (MB)",
        description="Memory for the clean and intervened logits held at once; None: 768 MB "
        "on a CPU (cache-sized blocks), 40% of the free memory on a GPU (at most 24 GB)",
    )
    fdr_level: float = Field(
        default=0.05,
        gt=0.0,
        lt=1.0,
        title="FDR Level",
        description="Benjamini-Hochberg false discovery rate below which a latent with "
        "NCES > 1 counts as causally verified",
    )
    random_seed: int = Field(
        default=42,
        title="Random Seed",
        description="Seed for the latent subset, null directions, resampling and bootstrap",
    )
    n_bootstrap: int = Field(
        default=2000,
        ge=1,
        title="Bootstrap Resamples",
        description="Resamples of the paired bootstrap confidence interval of each NCES",
    )

    @model_validator(mode="after")
    def _check_adaptive(self) -> NCESEvalConfig:
        """With ``adaptive``, the second round extends the first and stops only above fdr_level."""
        if not self.adaptive:
            return self
        if self.adaptive_futility < self.fdr_level:
            raise ValueError(
                f"adaptive_futility={self.adaptive_futility} must be at least fdr_level="
                f"{self.fdr_level}: a stopped latent's p-value must be one BH never rejects"
            )
        if (
            self.adaptive_seqs_per_latent < self.seqs_per_latent
            or self.adaptive_null_draws < self.null_draws
        ):
            raise ValueError(
                "the adaptive second round must extend the first: adaptive_seqs_per_latent >= "
                "seqs_per_latent and adaptive_null_draws >= null_draws"
            )
        return self

    @field_validator("null")
    @classmethod
    def _parse_null(cls, value: str) -> str:
        """One or more of the known nulls, comma-separated, duplicates dropped."""
        return ",".join(check_nulls(value, NULLS))

    @property
    def nulls(self) -> tuple[str, ...]:
        """The requested nulls, the headline one first."""
        return check_nulls(self.null, NULLS)

    @property
    def engine_nulls(self) -> tuple[str, ...]:
        """The nulls the engine draws: :attr:`nulls`, with an older definition's ``matched``
        where asked (0.2.0: ``matched_eigen``, 0.3.0: ``matched_band``)."""
        old = {"0.2.0": "matched_eigen", "0.3.0": "matched_band"}.get(self.nces_definition)
        if old is not None:
            return tuple(old if null == "matched" else null for null in self.nulls)
        return self.nulls

    @field_validator("latents")
    @classmethod
    def _parse_latents(cls, value: str | int | list[int]) -> str | int | list[int]:
        """Accept 'auto', 'all', 'screen:N', a count, or indices (also as '3,17,42')."""
        if isinstance(value, str):
            text = value.strip()
            if text in ("all", "auto"):
                return text
            if text.startswith("screen:"):
                count = text.removeprefix("screen:")
                if not count.isdigit() or int(count) < 1:
                    raise ValueError("expected 'screen:N' with N >= 1 latents to score exactly")
                return f"screen:{int(count)}"
            if text.isdigit():
                value = int(text)
            else:
                try:
                    value = [int(part) for part in text.strip("[]").split(",") if part.strip()]
                except ValueError:
                    raise ValueError(
                        "expected 'auto', 'all', 'screen:N', a count, or comma-separated "
                        "latent indices"
                    ) from None
        if isinstance(value, int):
            if value < 1:
                raise ValueError("a latent count must be at least 1")
            return value
        if not value or min(value) < 0:
            raise ValueError("a latent list must be non-empty, with indices >= 0")
        return value
