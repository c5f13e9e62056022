#!/usr/bin/env bash
# Build .devbundle/: what the GPU check (python -m evals.gpu.check) needs on the GPU machine
# beyond its image (no network there; see evals/gpu/README.md). Wheels for Python 3.12 (cp312 where compiled), a
# stand-in for wandb (sae-lens imports it; the check never logs to it), and Gemma 3's tokenizer
# (xz-packed, from the embedded model's cache; built on first use of the embedded model).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
BUNDLE=.devbundle
rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/whl" "$BUNDLE/py/wandb" "$BUNDLE/gemma3-tokenizer"

"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$BUNDLE/whl" \
    sae-lens==6.54.12 sae-bench==0.6.0 transformer-lens==3.9.0 datasets==3.6.0 \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    better-abc==0.0.3 dill==0.3.8 multiprocess==0.70.16 simple-parsing==0.1.9 \
    docstring-parser==0.18.0 platformdirs==4.14.8

cat > "$BUNDLE/py/wandb/__init__.py" <<'STUB'
"""Stand-in for wandb where it is not installed: sae-lens imports it at import time, and the GPU
check trains with log_to_wandb=False, so nothing here is ever called."""

__version__ = "0.0.0+stub"


class _Absent:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        raise RuntimeError("wandb is not installed here (a stand-in module was imported)")

    def __getattr__(self, name):
        return _Absent()


def __getattr__(name):
    return _Absent()
STUB

CACHE=$("$PY" -c 'from csae_plugin.models import embedded_cache_dir; print(embedded_cache_dir())' 2>/dev/null || true)
if [ -z "$CACHE" ] || [ ! -f "$CACHE/tokenizer.json" ]; then
    CACHE=$(.venv/bin/python -c 'from csae_plugin.models import load_embedded_hf_model, embedded_cache_dir; load_embedded_hf_model(); print(embedded_cache_dir())')
fi
cp "$CACHE/tokenizer_config.json" "$BUNDLE/gemma3-tokenizer/"
xz -9 -T1 -c "$CACHE/tokenizer.json" > "$BUNDLE/gemma3-tokenizer/tokenizer.json.xz"
du -sh "$BUNDLE"
