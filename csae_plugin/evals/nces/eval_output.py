"""Output of the NCES eval in SAEBench's format: flat metrics, per-latent details, output model.

Undefined values (NaN, e.g. the NCES of a dead latent, or an infinite ratio) are ``null`` in
the JSON, hence the ``float | None`` fields. Regenerate the JSON schema beside this file with
``python -m csae_plugin.evals.nces.eval_output``.
"""

from pathlib import Path

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from sae_bench.evals.base_eval_output import (
    DEFAULT_DISPLAY,
    BaseEvalOutput,
    BaseMetricCategories,
    BaseMetrics,
    BaseResultDetail,
)

from csae_plugin.evals.nces.eval_config import NCESEvalConfig

EVAL_TYPE_ID_NCES = "nces"

SCHEMA_PATH = Path(__file__).with_name(f"eval_output_schema_{EVAL_TYPE_ID_NCES}.json")
"""The committed JSON schema of :class:`NCESEvalOutput` (shipped as package data)."""


@dataclass
class NCESMetrics(BaseMetrics):
    nces_median: float | None = Field(
        default=None,
        title="Median NCES",
        description="Median over evaluated, non-dead latents of NCES_i (0.3.0: the latent's "
        "geometric-mean effect over its null directions'); above 1 = moves the output more "
        "than a random direction of the same size and shape (the null named in 'null')",
        json_schema_extra=DEFAULT_DISPLAY,
    )
    nces_geomean: float | None = Field(
        default=None,
        title="Geometric Mean NCES",
        description="Geometric mean of the finite, positive NCES of non-dead latents: 1 for "
        "a dictionary of random directions shaped like their nulls (definition 0.3.0)",
        json_schema_extra=DEFAULT_DISPLAY,
    )
    nces_geomean_ci_low: float | None = Field(
        default=None,
        title="Geometric Mean NCES CI Low",
        description="Lower end of the bootstrap CI (over latents) of the geometric mean",
    )
    nces_geomean_ci_high: float | None = Field(
        default=None,
        title="Geometric Mean NCES CI High",
        description="Upper end of the bootstrap CI (over latents) of the geometric mean",
    )
    frac_verified: float | None = Field(
        default=None,
        title="Fraction Verified",
        description="Fraction of evaluated non-dead latents whose NCES > 1 passes the "
        "Benjamini-Hochberg test at fdr_level (causally verified)",
        json_schema_extra=DEFAULT_DISPLAY,
    )
    nces_rank: float | None = Field(
        default=None,
        title="NCES Rank",
        description="Mean over non-dead latents of the fraction of its null directions the "
        "latent beats (its percentile): 0.5 for random directions shaped like their nulls",
        json_schema_extra=DEFAULT_DISPLAY,
    )
    nces_rank_ci_low: float | None = Field(
        default=None,
        title="NCES Rank CI Low",
        description="Lower end of the bootstrap CI (over latents) of nces_rank",
    )
    nces_rank_ci_high: float | None = Field(
        default=None,
        title="NCES Rank CI High",
        description="Upper end of the bootstrap CI (over latents) of nces_rank",
    )
    frac_beats_null: float | None = Field(
        default=None,
        title="Fraction Beating the Null",
        description="Estimated fraction of non-dead latents whose direction moves the output "
        "more than their nulls' (Storey's 1 - pi0 from the p-values); unlike frac_verified, "
        "it does not shrink with the number of latents tested",
        json_schema_extra=DEFAULT_DISPLAY,
    )
    frac_beats_null_ci_low: float | None = Field(
        default=None,
        title="Fraction Beating the Null CI Low",
        description="Lower end of the bootstrap CI (over latents) of frac_beats_null",
    )
    frac_beats_null_ci_high: float | None = Field(
        default=None,
        title="Fraction Beating the Null CI High",
        description="Upper end of the bootstrap CI (over latents) of frac_beats_null",
    )
    frac_verified_all_nulls: float | None = Field(
        default=None,
        title="Fraction Verified (All Nulls)",
        description="Fraction of evaluated non-dead latents verified under every null run "
        "(the conservative verdict; equal to frac_verified with one null)",
    )
    frac_dead: float | None = Field(
        default=None,
        title="Fraction Dead",
        description="Fraction of evaluated latents that never fire on the evaluation tokens",
        json_schema_extra=DEFAULT_DISPLAY,
    )
    activation_weighted_nces: float | None = Field(
        default=None,
        title="Activation-Weighted NCES",
        description="NCES averaged with weights firing frequency x mean activation when "
        "active (the latent's mean activation on reference tokens); a geometric mean in 0.3.0",
    )
    mean_effect_kl: float | None = Field(
        default=None,
        title="Mean Effect KL",
        description="Mean over non-dead latents of the per-sequence KL(p_clean || "
        "p_intervened) in nats, averaged over positions from the first intervened one",
    )
    mean_null_kl: float | None = Field(
        default=None,
        title="Mean Null KL",
        description="The same for the null's random directions (mean over draws)",
    )
    n_latents_evaluated: int | None = Field(
        default=None,
        title="Latents Evaluated",
        description="Number of latents evaluated (dead ones included)",
    )
    copies_per_latent: float | None = Field(
        default=None,
        title="Copies per Latent",
        description="Intervened sequence copies per evaluated latent and null, on average: "
        "sequences x (1 + null draws), the adaptive second round included",
    )
    intervention: str | None = Field(
        default=None,
        title="Intervention",
        description="How each latent was changed: zero, mean, resample or steer",
    )
    null_draws: int | None = Field(
        default=None,
        title="Null Draws",
        description="Random directions per latent in the null",
    )
    null: str | None = Field(
        default=None,
        title="Null",
        description="The random-direction null these metrics are relative to",
    )
    nces_definition: str | None = Field(
        default=None,
        title="NCES Definition",
        description="Version of the NCES definition these numbers follow (0.4.0, 0.3.0 or 0.2.0)",
    )


@dataclass
class NCESMetricCategories(BaseMetricCategories):
    nces: NCESMetrics = Field(
        title="NCES",
        description="Causal effect of single latents relative to random directions (the "
        "first null requested)",
        json_schema_extra=DEFAULT_DISPLAY,
    )
    nces_matched: NCESMetrics = Field(
        default_factory=NCESMetrics,
        title="NCES, Matched Null",
        description="The same metrics against the 'matched' null (all null if it was not run)",
    )
    nces_matched_eigen: NCESMetrics = Field(
        default_factory=NCESMetrics,
        title="NCES, Eigen-Matched Null",
        description="The same metrics against the 'matched_eigen' null (0.2.0's matched; all "
        "null if it was not run)",
    )
    nces_covariance: NCESMetrics = Field(
        default_factory=NCESMetrics,
        title="NCES, Covariance Null",
        description="The same metrics against the 'covariance' null (all null if it was not run)",
    )
    nces_isotropic: NCESMetrics = Field(
        default_factory=NCESMetrics,
        title="NCES, Isotropic Null",
        description="The same metrics against the 'isotropic' null (all null if it was not run)",
    )


@dataclass
class NCESLatentDetail(BaseResultDetail):
    latent: int = Field(title="Latent", description="Index of the latent in the SAE")
    nces: float | None = Field(
        title="NCES",
        description="0.3.0 and 0.4.0: exp(mean log effect of the latent's direction - mean "
        "over its "
        "null directions of theirs), over its sequences; 0.2.0: sum of effects / sum of null "
        "effects",
    )
    ci_low: float | None = Field(
        title="CI Low",
        description="Lower end of the bootstrap CI of NCES (sequences and null draws resampled)",
    )
    ci_high: float | None = Field(
        title="CI High",
        description="Upper end of the bootstrap CI of NCES (sequences and null draws resampled)",
    )
    percentile: float | None = Field(
        default=None,
        title="Percentile",
        description="Fraction of its null directions the latent's direction beats (ties half)",
    )
    p_value: float | None = Field(
        title="p-value",
        description="One-sided p-value that the latent's direction beats random directions",
    )
    q_value: float | None = Field(
        title="q-value", description="Benjamini-Hochberg adjusted p-value across latents"
    )
    verified: bool = Field(title="Verified", description="q_value < fdr_level and NCES > 1")
    dead: bool = Field(title="Dead", description="The latent never fires on the evaluation tokens")
    effect_kl: float | None = Field(title="Effect KL", description="Mean effect per sequence, nats")
    null_kl: float | None = Field(
        title="Null KL", description="Mean null effect per sequence, nats"
    )
    n_sequences: int = Field(
        title="Sequences", description="Evaluation sequences in which the latent was scored"
    )
    n_null_draws: int | None = Field(
        default=None,
        title="Null Draws",
        description="Null directions per null the latent was compared with (more than "
        "null_draws for a latent given the adaptive second round)",
    )
    second_round: bool | None = Field(
        default=None,
        title="Second Round",
        description="With adaptive: whether the latent, undecided after round 1, got the "
        "second round (its numbers are then from all its data)",
    )
    neuron_null: bool | None = Field(
        default=None,
        title="Neuron-Permuted Null",
        description="Whether the 'matched' null (definition 0.4.0) drew this latent's null "
        "directions by permuting its own coordinates (a latent on far fewer coordinates than "
        "band-shaped directions) rather than from the spectral bands",
    )
    verified_all_nulls: bool = Field(
        default=False,
        title="Verified (All Nulls)",
        description="Verified under every null run (equal to verified with one null)",
    )
    nces_matched: float | None = Field(default=None, title="NCES (Matched Null)")
    ci_low_matched: float | None = Field(default=None, title="CI Low (Matched Null)")
    ci_high_matched: float | None = Field(default=None, title="CI High (Matched Null)")
    percentile_matched: float | None = Field(default=None, title="Percentile (Matched Null)")
    p_value_matched: float | None = Field(default=None, title="p-value (Matched Null)")
    q_value_matched: float | None = Field(default=None, title="q-value (Matched Null)")
    verified_matched: bool | None = Field(default=None, title="Verified (Matched Null)")
    null_kl_matched: float | None = Field(default=None, title="Null KL (Matched Null)")
    nces_matched_eigen: float | None = Field(default=None, title="NCES (Eigen-Matched Null)")
    ci_low_matched_eigen: float | None = Field(default=None, title="CI Low (Eigen-Matched Null)")
    ci_high_matched_eigen: float | None = Field(default=None, title="CI High (Eigen-Matched Null)")
    percentile_matched_eigen: float | None = Field(
        default=None, title="Percentile (Eigen-Matched Null)"
    )
    p_value_matched_eigen: float | None = Field(default=None, title="p-value (Eigen-Matched Null)")
    q_value_matched_eigen: float | None = Field(default=None, title="q-value (Eigen-Matched Null)")
    verified_matched_eigen: bool | None = Field(default=None, title="Verified (Eigen-Matched Null)")
    null_kl_matched_eigen: float | None = Field(default=None, title="Null KL (Eigen-Matched Null)")
    nces_covariance: float | None = Field(default=None, title="NCES (Covariance Null)")
    ci_low_covariance: float | None = Field(default=None, title="CI Low (Covariance Null)")
    ci_high_covariance: float | None = Field(default=None, title="CI High (Covariance Null)")
    percentile_covariance: float | None = Field(default=None, title="Percentile (Covariance Null)")
    p_value_covariance: float | None = Field(default=None, title="p-value (Covariance Null)")
    q_value_covariance: float | None = Field(default=None, title="q-value (Covariance Null)")
    verified_covariance: bool | None = Field(default=None, title="Verified (Covariance Null)")
    null_kl_covariance: float | None = Field(default=None, title="Null KL (Covariance Null)")
    nces_isotropic: float | None = Field(default=None, title="NCES (Isotropic Null)")
    ci_low_isotropic: float | None = Field(default=None, title="CI Low (Isotropic Null)")
    ci_high_isotropic: float | None = Field(default=None, title="CI High (Isotropic Null)")
    percentile_isotropic: float | None = Field(default=None, title="Percentile (Isotropic Null)")
    p_value_isotropic: float | None = Field(default=None, title="p-value (Isotropic Null)")
    q_value_isotropic: float | None = Field(default=None, title="q-value (Isotropic Null)")
    verified_isotropic: bool | None = Field(default=None, title="Verified (Isotropic Null)")
    null_kl_isotropic: float | None = Field(default=None, title="Null KL (Isotropic Null)")


@dataclass(config=ConfigDict(title="NCES"))
class NCESEvalOutput(BaseEvalOutput[NCESEvalConfig, NCESMetricCategories, NCESLatentDetail]):
    # This will end up being the description of the eval in the UI.
    """
    Normalized Causal Effect Score: for each latent, how much changing only that latent (with
    the SAE error kept) moves the model's output distribution, relative to perturbations of
    the same size at the same positions along random directions shaped like the latent's own
    (the 'matched' null by default). A latent is causally verified when its NCES is
    significantly above 1.
    """

    eval_config: NCESEvalConfig
    eval_id: str
    datetime_epoch_millis: int
    eval_result_metrics: NCESMetricCategories
    eval_result_details: list[NCESLatentDetail] = Field(
        default_factory=list,
        title="Per-Latent NCES",
        description="NCES, confidence interval, q-value and verdict of each evaluated latent",
    )
    eval_type_id: str = Field(
        default=EVAL_TYPE_ID_NCES,
        title="Eval Type ID",
        description="The type of the evaluation",
    )


if __name__ == "__main__":
    from sae_bench.evals.generate_json_schemas import generate_json_schema

    generate_json_schema(NCESEvalOutput, str(SCHEMA_PATH))
    print(f"wrote {SCHEMA_PATH}")
