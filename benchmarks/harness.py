"""Shared benchmark plumbing: one process per measurement, medians of repeated steps."""

import json
import os
import resource
import subprocess
import sys
import time


def measure(step, repeats: int) -> dict:
    """Runs `step()` once (warm-up, tracing included), then `repeats` times.

    `step()` must return something whose `.numpy()`-able leaves force the computation.
    Returns the first-call and median step seconds and the peak RSS growth (MB) over the whole
    measurement, from the RSS before the first call.
    """
    def force(result):
        for leaf in (result if isinstance(result, (list, tuple)) else [result]):
            if isinstance(leaf, (list, tuple)):
                force(leaf)
            elif hasattr(leaf, "numpy"):
                leaf.numpy()

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    force(step())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        force(step())
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times.sort()
    return {"first_s": first, "step_s": times[len(times) // 2], "peak_mb": peak / 1024,
            "growth_mb": (peak - base) / 1024}


def run_worker(script: str, *args) -> dict:
    """Runs `script --worker args...` in a fresh process; its last stdout line is JSON."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, script, "--worker", *map(str, args)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        lines = (out.stderr.strip() or "failed").splitlines()
        return {"error": lines[-1][:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])
