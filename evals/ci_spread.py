"""How far the CI comparison's numbers move on another CPU: the "ci" sweep rerun as other
machines would run it, for setting ``ci_compare.TOLERANCES``.

Same seed, same machine, same thread count: two runs are bit-identical
(``evals/results/reproducibility_gemma-3-270m.json``). What differs on the CI machine is the
CPU's vector units, the math library's code path and the thread count, i.e. floating-point
reduction order. Each is emulated here in a fresh process: torch's kernels
(``ATEN_CPU_CAPABILITY``), MKL's code path (``MKL_ENABLE_INSTRUCTIONS``) and the number of
threads. Every run is compared with the committed reference (this machine, native settings).

    python evals/ci_spread.py   # about 30 minutes on 2 cores

Writes ``evals/results/ci_spread_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
from ci_compare import METRICS, REFERENCE
from sweep import machine

MACHINES = {
    "native_2threads": {"OMP_NUM_THREADS": "2"},
    "avx2_mkl-avx2_1thread": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "OMP_NUM_THREADS": "1",
    },
    "default_mkl-sse42_2threads": {
        "ATEN_CPU_CAPABILITY": "default",
        "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
        "OMP_NUM_THREADS": "2",
    },
}
"""This machine as the reference was made (a check that it still reproduces), and two emulated
machines: an AVX2-only CPU on one thread, a CPU with no AVX on two."""


def run_emulated(env: dict[str, str], out: Path) -> pd.DataFrame:
    """The ci sweep in a fresh process with ``env`` (the kernels are chosen at import)."""
    here = Path(__file__).parent
    code = f"import ci_compare; ci_compare.run_ci_sweep(__import__('pathlib').Path({str(out)!r}))"
    subprocess.run([sys.executable, "-c", code], cwd=here, env={**os.environ, **env}, check=True)
    return pd.read_csv(out / "table.csv", index_col="sae")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "ci_spread_cpu.json"
    )
    parser.add_argument(
        "--machines",
        default=",".join(MACHINES),
        help="which emulated machines to run (comma-separated); runs already in --out are kept",
    )
    args = parser.parse_args(argv)
    reference = json.loads(REFERENCE.read_text())
    result = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": {}}
    runs = result["runs"]
    runs["reference (native, 2 threads)"] = reference["table"]
    for name in args.machines.split(","):
        env = MACHINES[name]
        with tempfile.TemporaryDirectory() as tmp:
            table = run_emulated(env, Path(tmp))
        runs[name] = {sae: {m: float(table.loc[sae, m]) for m in METRICS} for sae in table.index}
        print(f"[ci_spread] {name}: {runs[name]}", flush=True)
        spread = {
            sae: {
                m: max(r[sae][m] for r in runs.values()) - min(r[sae][m] for r in runs.values())
                for m in METRICS
            }
            for sae in reference["table"]
        }
        result.update(
            {
                "machines": {n: MACHINES[n] for n in runs if n in MACHINES},
                "host": machine(),
                "runs": runs,
                "spread_max_minus_min": spread,
            }
        )
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # after every machine
    print(json.dumps(result.get("spread_max_minus_min"), indent=2))
    return result


if __name__ == "__main__":
    main()
