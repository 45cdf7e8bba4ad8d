"""One step of a trained stateful model where it is served: the TensorFlow Lite export, the
SavedModel export and the chain's own online step, the state carried.

    python benchmarks/served_step.py [--units 128] [--features 40] [--repeats 5] [--calls 500]

A GRU of `--units` units over `--features` features and a Dense(12) head, B=1, one step
[1, 1, F] per call: `tf.lite.Interpreter`'s signature runner on
`model.export(path, format="tflite")`, `served.step` of `model.export(path)` loaded with
`tf.saved_model.load`, and `chain(x_t, state)`, alternating in one process. Each figure is the
median over `--repeats` rounds of the mean time of `--calls` consecutive steps; the three
outputs are checked equal first.
"""

import argparse
import os
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from harness import positive_int  # noqa: E402 (benchmarks/ is the folder)

import tbptt  # noqa: E402


def steppers(units: int, features: int, folder: str) -> dict:
    """name -> step(x [1, 1, F]) carrying its own state."""
    chain = tbptt.StatefulGRUChain(units, head=keras.layers.Dense(12), chunk_size=50)
    model = tbptt.keras.ChunkedModel(chain, stateful=True)
    model.build([None, None, features])
    model.export(os.path.join(folder, "chain.tflite"), format="tflite", verbose=False)
    model.export(os.path.join(folder, "served"), verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the interpreter's move to the LiteRT package
        runner = tf.lite.Interpreter(
            model_path=os.path.join(folder, "chain.tflite")
        ).get_signature_runner()
    served = tf.saved_model.load(os.path.join(folder, "served"))
    states = {
        "tflite": {"state_0": np.zeros([1, units], "float32")},
        "savedmodel": served.initial_state(1),
        "online": chain.initial_state(1),
    }

    def lite(x):
        out = runner(inputs=x, **states["tflite"])
        states["tflite"] = {"state_0": out["state_0"]}
        return out["outputs"]

    def saved(x):
        out, states["savedmodel"] = served.step(x, states["savedmodel"])
        return out

    def online(x):
        out, states["online"] = chain(x, states["online"])
        return out

    return {"tflite": lite, "savedmodel": saved, "online": online}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=positive_int, default=128)
    parser.add_argument("--features", type=positive_int, default=40)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--calls", type=positive_int, default=500)
    args = parser.parse_args()
    stream = np.random.default_rng(0).normal(size=[1, args.calls, args.features])
    stream = stream.astype("float32")
    with tempfile.TemporaryDirectory() as folder:
        steps = steppers(args.units, args.features, folder)
        first = {name: np.asarray(step(stream[:, :1])) for name, step in steps.items()}
        for name, value in first.items():
            np.testing.assert_allclose(value, first["online"], rtol=1e-5, atol=1e-6, err_msg=name)
        times: dict = {name: [] for name in steps}
        for _ in range(args.repeats):
            for name, step in steps.items():
                start = time.perf_counter()
                for t in range(args.calls):
                    step(stream[:, t : t + 1])
                times[name].append((time.perf_counter() - start) / args.calls * 1e3)
    print(f"GRU {args.units}, F={args.features}, B=1, one step per call (ms, median)")
    print("| where | ms / step |\n| --- | ---: |")
    for name, values in times.items():
        print(f"| {name} | {np.median(values):.3f} |")


if __name__ == "__main__":
    main()
