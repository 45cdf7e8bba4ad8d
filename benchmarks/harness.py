"""Shared benchmark plumbing: one process per measurement, medians of repeated steps."""

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def measure(step, repeats: int) -> dict:
    """Runs `step()` once (warm-up, tracing included), then `repeats` times.

    `step()` must return something whose `.numpy()`-able leaves force the computation.
    Returns the first-call and median step seconds (the first call's with repeats=0), the
    process's peak RSS (MB) and its growth over the measurement: the peak minus the resident
    memory just before the first call (inputs already made, so they do not count).
    """
    base = _rss_gb(os.getpid()) * 2**20  # KB, now
    _reset_peak_rss()  # making the inputs may have raised the high-water mark above the step's
    start = time.perf_counter()
    force(step())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        force(step())
        times.append(time.perf_counter() - start)
    peak = _peak_rss_kb()
    times = sorted(times) or [first]
    return {
        "first_s": first,
        "step_s": times[len(times) // 2],
        "peak_mb": peak / 1024,
        "growth_mb": (peak - base) / 1024,
    }


def force(result) -> None:
    """Waits for every `.numpy()`-able leaf of `result` (nested lists and tuples)."""
    for leaf in result if isinstance(result, (list, tuple)) else [result]:
        if isinstance(leaf, (list, tuple)):
            force(leaf)
        elif hasattr(leaf, "numpy"):
            leaf.numpy()


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of one [size, size] float32 matmul in TensorFlow, median of `repeats`: the
    machine's peak the benchmarks' shares are of."""
    import statistics

    import tensorflow as tf

    a = tf.random.stateless_normal([size, size], [1, 2])
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        tf.matmul(a, a).numpy()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times[1:]) / 1e9


def _reset_peak_rss() -> None:
    """Linux >= 4.0: writing 5 to clear_refs resets the process's VmHWM to its current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_kb() -> float:
    """VmHWM (resettable) where /proc has it, else ru_maxrss (the lifetime peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _rss_gb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def run_worker(script: str, *args, cap_gb: float = 0.0) -> dict:
    """Runs `script --worker args...` in a fresh process; its last stdout line is JSON.

    With `cap_gb`, a worker whose resident memory passes it is stopped (Linux /proc), and the
    row says so: that is how full BPTT "cannot run" at long T without swapping the machine.
    """
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    process = subprocess.Popen(
        [sys.executable, script, "--worker", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    peak = 0.0
    while cap_gb and process.poll() is None:
        peak = max(peak, _rss_gb(process.pid))
        if peak > cap_gb:
            process.kill()
            process.communicate()
            return {"skipped": f"stopped at RSS > {cap_gb:g} GB"}
        time.sleep(0.2)
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        lines = (stderr.strip() or "failed").splitlines()
        return {"error": lines[-1][:120]}
    return json.loads(stdout.strip().splitlines()[-1])


def markdown_table(rows: list, key: str, key_label, baseline: str, ms: bool = False) -> str:
    """One row per measurement; the ratio column divides by `baseline`'s time at the same key."""
    unit = "ms" if ms else "s"
    lines = [
        f"| {key_label} | method | step time ({unit}) | x {baseline} | peak RSS (MB) | "
        "RSS growth (MB) |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    base = {r[key]: r for r in rows if r["method"] == baseline and "step_s" in r}
    for r in rows:
        if "step_s" not in r:
            reason = r.get("skipped") or "failed: " + r.get("error", "?")
            lines.append(f"| {r[key]} | {r['method']} | {reason} | | | |")
            continue
        ratio = f"{r['step_s'] / base[r[key]]['step_s']:.2f}" if r[key] in base else "-"
        step = r["step_s"] * (1e3 if ms else 1)
        lines.append(
            f"| {r[key]} | {r['method']} | {step:.{1 if ms else 3}f} | {ratio} | "
            f"{r['peak_mb']:.0f} | {r['growth_mb']:.0f} |"
        )
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


def save(
    rows: list,
    name: str,
    text: str,
    key: str,
    methods,
    xlabel: str,
    xlog: bool = False,
    update_readme: bool = False,
    plot_fn=None,
) -> None:
    """Prints the table and writes NAME.md and NAME.png to benchmarks/results/ (not tracked);
    `plot_fn(path)` draws the plot instead of `plot` when given.

    With `update_readme`, the table also replaces the documentation's between the lines
    ``<!-- NAME -->`` and ``<!-- /NAME -->`` and goes to the tracked benchmarks/NAME.md.
    """
    print(text)
    here = os.path.dirname(os.path.abspath(__file__))
    results = os.path.join(here, "results")
    os.makedirs(results, exist_ok=True)
    with open(os.path.join(results, f"{name}.md"), "w") as f:
        f.write(text + "\n")
    image = os.path.join(results, f"{name}.png")
    if plot_fn is not None:
        plot_fn(image)
    else:
        plot(rows, key, methods, image, xlabel, xlog=xlog)
    print(f"wrote benchmarks/results/{name}.md and .png")
    if update_readme:
        with open(os.path.join(here, f"{name}.md"), "w") as f:
            f.write(text + "\n")
        replace_in_readme(name, text)


def replace_in_readme(name: str, text: str) -> None:
    """Puts `text` between the ``<!-- name -->`` and ``<!-- /name -->`` lines of the page that
    has them: the documentation's (docs/*.md, docs/guides/*.md) or the README."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    start, end = f"<!-- {name} -->\n", f"<!-- /{name} -->"
    pages = [os.path.join(root, "README.md")] + sorted(
        os.path.join(folder, file)
        for folder in (os.path.join(root, "docs"), os.path.join(root, "docs", "guides"))
        for file in os.listdir(folder)
        if file.endswith(".md")
    )
    for path in pages:
        with open(path) as f:
            page = f.read()
        if start in page and end in page:
            before, rest = page.split(start, 1)
            with open(path, "w") as f:
                f.write(before + start + text + "\n" + end + rest.split(end, 1)[1])
            print(f"updated {os.path.relpath(path, root)} ({name}) and benchmarks/{name}.md")
            return
    raise SystemExit(f"no page has {start.strip()} ... {end} lines to put the table in")


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1, or the option's error naming what came."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value
