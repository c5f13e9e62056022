"""The project's own measurements of the plugin (not part of the installed package), by purpose:

- ``evals.benchmarks``: speed. ``nces`` (the NCES engine against the naive reference and the
  floor; ``--screen``: the second-order screen of whole dictionaries; ``--sharding``: one
  process against several), ``training`` (causal SAE vs TopK throughput), ``screen_vs_exact``
  (how well the screen ranks latents).
- ``evals.ci``: the comparison ``sweep`` (causal SAE vs SAELens's baselines; its ``ci`` preset
  is what CI reruns), ``compare`` (the CI comparison against ``reference_ci.json``).
- ``evals.gpu``: the one-shot GPU check (``check``, its stages, ``bundle.sh`` and README).
- ``evals.study``: the comparison study (``study``) and its measurements (``probing``,
  ``overhead``, ``nces_definition``); findings in ``evals/REPORT.md``.
- ``evals.common``: what they share (results folder, machine info, JSON files, model and
  tokens, a data-initialised TopK SAE, step and memory clocks).

Results go to ``evals/results/``. Run the scripts as modules from the repository root, e.g.
``python -m evals.study.study --tables-only``.
"""
