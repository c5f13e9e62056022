"""The NCES eval in SAEBench's layout: ``eval_config.py``, ``eval_output.py``, ``main.py``.

Run it from Python with ``main.run_eval`` (SAEBench's contract) or ``main.evaluate_sae`` (one SAE,
no files), or from the shell with ``sae_bench run --eval nces``. The metric's definition is in
``docs/nces.md``; its maths in ``csae_plugin.causal.nces`` and ``csae_plugin.causal``.
"""
