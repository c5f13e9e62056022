"""The comparison study (``study``) and its measurements: targeted probing (``probing``), the
cost per architecture (``overhead``) and the NCES definition (``nces_definition``). Findings in
``evals/REPORT.md``."""
