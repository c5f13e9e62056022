"""Causal effects of SAE latents: the model's tail, the intervention engine and NCES statistics."""
