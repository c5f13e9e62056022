"""The one-shot GPU check (``python -m evals.gpu.check``; how to run it on the GPU machine:
``evals/gpu/README.md``): ``check`` (arguments, the stage list, the verdict), ``runner`` (scale,
stage runner, result file), ``stages_setup`` (machine, imports, model), ``stages_run``
(training, ``sae_bench run``, bfloat16), ``stages_engine`` (GPU against CPU, engine timing);
``bundle.sh`` builds what the GPU machine lacks."""
