"""Causal effects of SAE latents: the model's tail after the hook (:mod:`.tail`), what an
intervention and its null are (:mod:`.interventions`, drawn from the seeded streams of
:mod:`.draws`), reference statistics (:mod:`.reference_stats`), the batched engine
(:mod:`.engine`) with its slow reference (:mod:`.naive`), and the NCES statistics
(:mod:`.nces`)."""

from csae_plugin.causal.draws import draw_generator
from csae_plugin.causal.engine import LatentEffects, latent_effects
from csae_plugin.causal.interventions import (
    DEFAULT_NULL,
    INTERVENTIONS,
    NULLS,
    check_nulls,
    decoder_directions,
    latent_null_directions,
    null_directions,
    resample_values,
    spectral_bands,
)
from csae_plugin.causal.naive import naive_latent_effect, naive_latent_effects
from csae_plugin.causal.reference_stats import ReferenceStats, reference_stats

__all__ = [
    "DEFAULT_NULL",
    "INTERVENTIONS",
    "NULLS",
    "LatentEffects",
    "ReferenceStats",
    "check_nulls",
    "decoder_directions",
    "draw_generator",
    "latent_effects",
    "latent_null_directions",
    "naive_latent_effect",
    "naive_latent_effects",
    "null_directions",
    "reference_stats",
    "resample_values",
    "spectral_bands",
]
