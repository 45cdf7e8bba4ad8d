"""A trained chain as a SavedModel that serves it with its state in and out.

```
served = tf.saved_model.load(path)                    # no tbptt needed, plain TensorFlow ops
state = served.initial_state(batch_size)              # the nest of chain.initial_state
outputs, state = served.step(inputs [B, T, ...], state)
outputs = served.serve(inputs)                        # from a zero state, as Keras's export
served.signatures["serving_default"](inputs=..., state_0=..., state_1=...)
    -> {"outputs": [B, T, O], "state_0": ..., "state_1": ...}     (flat, for TF Serving)
```

Batch size and number of steps are free. Token ids (a chain with an inputs layer) may be of any
integer dtype in `step` and `serve` (NumPy's default is int64); the flat signature takes int32. The
loops are the chain's own, run as TensorFlow ops (`xla=False`): a serving process needs no XLA
compiler.
"""

import tensorflow as tf

from tbptt._src.core import checks, compat

# The id dtypes `step` and `serve` are traced for (every integer dtype), the signature's first.
ID_DTYPES = (
    tf.int32,
    tf.int64,
    tf.int8,
    tf.int16,
    tf.uint8,
    tf.uint16,
    tf.uint32,
    tf.uint64,
)


def _check_built(chain) -> None:
    if not chain.built:
        raise ValueError(
            "export needs a built chain: call the model (or fit it) once, or "
            "model.build([None, None, features]), before exporting."
        )


class ServingModule(tf.Module):
    """The functions a SavedModel of a chain holds (see the module docstring)."""

    def __init__(self, chain):
        super().__init__(name="tbptt_serving")
        _check_built(chain)
        self.chain = chain.with_config(xla=False, check_numerics=False)
        # Every variable the layers hold, their seed generators' states included, tracked here:
        # a SavedModel keeps only what its object graph reaches.
        self.held_variables = [
            compat.tf_variable(v) for part in chain.parts for v in getattr(part, "variables", [])
        ]
        leaves = tf.nest.flatten(chain.initial_state(1))
        self._structure = chain.initial_state(1)
        self._state_specs = [
            tf.TensorSpec([None] + leaf.shape[1:].as_list(), leaf.dtype) for leaf in leaves
        ]
        dtypes = (chain.dtype,) if chain.inputs_layer is None else ID_DTYPES
        self._inputs_dtype = chain.dtype if chain.inputs_layer is None else tf.int64
        inputs_specs = [tf.TensorSpec(chain.input_shape, dtype) for dtype in dtypes]
        state_specs = tf.nest.pack_sequence_as(self._structure, self._state_specs)
        # The chain traced once; `step`, `serve` and the signature call that trace, each traced
        # for every inputs dtype (the loaded function picks the trace by its argument).
        self.chain_step = tf.function(self._chain_step)
        self.chain_step.get_concrete_function(
            tf.TensorSpec(chain.input_shape, self._inputs_dtype), state_specs
        )
        self.step = tf.function(self._step)
        self.serve = tf.function(self._serve)
        for spec in inputs_specs:
            self.step.get_concrete_function(spec, state_specs)
            self.serve.get_concrete_function(spec)
        self.initial_state = tf.function(
            self._initial_state, input_signature=[tf.TensorSpec([], tf.int32)]
        )
        named = [tf.TensorSpec(chain.input_shape, dtypes[0], "inputs")] + [
            tf.TensorSpec(spec.shape, spec.dtype, f"state_{i}")
            for i, spec in enumerate(self._state_specs)
        ]
        self.serve_with_state = tf.function(self._serve_with_state, input_signature=named)

    def _chain_step(self, inputs, state):
        return self.chain(inputs, state)

    def _step(self, inputs, state):
        return self.chain_step(tf.cast(inputs, self._inputs_dtype), state)

    def _initial_state(self, batch_size):
        return tf.nest.pack_sequence_as(
            self._structure,
            [
                tf.zeros(tf.concat([[batch_size], spec.shape[1:].as_list()], 0), spec.dtype)
                for spec in self._state_specs
            ],
        )

    def _serve(self, inputs):
        return self.step(inputs, self._initial_state(tf.shape(inputs)[0]))[0]

    def _serve_with_state(self, inputs, *leaves):
        outputs, state = self.step(inputs, tf.nest.pack_sequence_as(self._structure, leaves))
        served = {"outputs": outputs}
        served.update({f"state_{i}": leaf for i, leaf in enumerate(tf.nest.flatten(state))})
        return served

    def signatures(self) -> dict:
        """The flat serving signature: named inputs `inputs`, `state_0`, ... (TF Serving, other
        languages' clients, `saved_model_cli`)."""
        # The function itself (it has an input signature), not a concrete function of it:
        # TensorFlow saves a concrete function over a tf.distribute strategy's variables only
        # when it traces it for the SavedModel.
        return {"serving_default": self.serve_with_state}


def export(
    chain, filepath, *, format: str = "tf_saved_model", verbose: bool = False, **options
) -> None:
    """Writes `chain` to `filepath` as a SavedModel (see the module docstring), or with
    format="tflite" (or "litert") as a streaming TensorFlow Lite model (`export_lite`)."""
    if format in LITE_FORMATS:
        export_lite(chain, filepath, verbose=verbose, **options)
        return
    if format != "tf_saved_model" or options:
        raise ValueError(
            f"ChunkedModel.export writes format='tf_saved_model' (a SavedModel with the "
            f"state in and out, no options) or format='tflite' (options steps, batch_size); "
            f"got format={format!r} and {sorted(options)}."
        )
    module = ServingModule(chain)
    # Gradients are not served: without them a SavedModel holds the forward functions only.
    save_options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
    tf.saved_model.save(module, str(filepath), signatures=module.signatures(), options=save_options)
    if verbose:
        print(
            f"Saved the chain to {filepath}: step(inputs, state), serve(inputs), "
            "initial_state(batch_size), and the signature serving_default(inputs, "
            "state_0, ...)."
        )


LITE_FORMATS = ("tflite", "litert")


def export_lite(
    chain, filepath, *, steps: int = 1, batch_size: int = 1, verbose: bool = False
) -> None:
    """Writes `chain` to `filepath` as a TensorFlow Lite (LiteRT) model that runs `steps` steps
    of `batch_size` streams per call, the state as named input and output tensors:

    ```
    runner = tf.lite.Interpreter(model_path=path).get_signature_runner()   # or ai_edge_litert
    state = {f"state_{i}": zeros for each leaf of chain.initial_state(batch_size)}
    for packet in stream:                               # [batch_size, steps, ...]
        out = runner(inputs=packet, **state)            # {"outputs", "state_0", ...}
        state = {name: out[name] for name in state}
    ```

    The steps are unrolled into the converter's built-in operators (no loop, no TensorFlow
    ops in the model); the weights are constants in it. Token ids are int32.
    """
    steps = checks.positive_int("steps", steps, " (time steps per call of the model)")
    batch_size = checks.positive_int("batch_size", batch_size, " (streams per call)")
    _check_built(chain)
    lite = chain.with_config(xla=False, check_numerics=False)
    structure = chain.initial_state(batch_size)
    leaves = tf.nest.flatten(structure)
    dtype = chain.dtype if chain.inputs_layer is None else tf.int32
    inputs = tf.TensorSpec([batch_size, steps] + list(chain.input_shape[2:]), dtype, "inputs")
    lite(tf.zeros(inputs.shape, dtype), structure)  # built and checked here, not in the trace
    specs = [inputs] + [
        tf.TensorSpec(leaf.shape, leaf.dtype, f"state_{i}") for i, leaf in enumerate(leaves)
    ]

    def step(inputs, *leaves):
        outputs, state = lite(inputs, tf.nest.pack_sequence_as(structure, list(leaves)))
        named = {f"state_{i}": leaf for i, leaf in enumerate(tf.nest.flatten(state))}
        return {"outputs": outputs, **named}

    traced = tf.function(step, input_signature=specs).get_concrete_function()
    constant = compat.frozen(traced)
    names = sorted(traced.structured_outputs)  # the order of the frozen function's outputs
    signature = tf.function(
        lambda *args: dict(zip(names, constant(*args))), input_signature=specs
    ).get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([signature], tf.Module())
    with tf.io.gfile.GFile(str(filepath), "wb") as file:
        file.write(converter.convert())
    if verbose:
        print(
            f"Saved the chain to {filepath} for TensorFlow Lite: inputs [{batch_size}, "
            f"{steps}, ...] and state_0 .. state_{len(leaves) - 1} in, outputs and the "
            "state out."
        )
