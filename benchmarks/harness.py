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


def markdown_table(rows: list, key: str, key_label, baseline: str, ms: bool = False) -> str:
    """One row per measurement; the ratio column divides by `baseline`'s time at the same key."""
    unit = "ms" if ms else "s"
    lines = [f"| {key_label} | method | step time ({unit}) | x {baseline} | peak RSS (MB) | "
             "RSS growth (MB) |", "| ---: | --- | ---: | ---: | ---: | ---: |"]
    base = {r[key]: r for r in rows if r["method"] == baseline and "step_s" in r}
    for r in rows:
        if "step_s" not in r:
            reason = r.get("skipped") or "failed: " + r.get("error", "?")
            lines.append(f"| {r[key]} | {r['method']} | {reason} | | | |")
            continue
        ratio = r["step_s"] / base[r[key]]["step_s"] if r[key] in base else float("nan")
        step = r["step_s"] * (1e3 if ms else 1)
        lines.append(f"| {r[key]} | {r['method']} | {step:.{1 if ms else 3}f} | {ratio:.2f} | "
                     f"{r['peak_mb']:.0f} | {r['growth_mb']:.0f} |")
    return "\n".join(lines)


def plot(rows: list, key: str, methods, path: str, xlabel: str, xlog: bool = False) -> None:
    """Step time and RSS growth against `key`, one line per method (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in methods:
        ok = [r for r in rows if r["method"] == method and "step_s" in r]
        axes[0].plot([r[key] for r in ok], [r["step_s"] for r in ok], "o-", label=method)
        axes[1].plot([r[key] for r in ok], [r["growth_mb"] for r in ok], "o-", label=method)
    axes[0].set(xlabel=xlabel, ylabel="step time (s)", yscale="log")
    axes[1].set(xlabel=xlabel, ylabel="peak RSS growth (MB)")
    if xlog:
        axes[0].set_xscale("log")
        axes[1].set_xscale("log")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def save(rows: list, name: str, text: str, key: str, methods, xlabel: str,
         xlog: bool = False) -> None:
    """Prints the table and writes benchmarks/NAME.md and benchmarks/NAME.png."""
    print(text)
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, f"{name}.md"), "w") as f:
        f.write(text + "\n")
    plot(rows, key, methods, os.path.join(here, f"{name}.png"), xlabel, xlog=xlog)
