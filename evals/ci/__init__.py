"""The comparison sweep (``sweep``: the causal SAE against SAELens's baselines; its ``ci`` preset
is what CI reruns) and the CI comparison (``compare``) against ``reference_ci.json``."""
