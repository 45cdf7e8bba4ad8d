"""The one thing a backend supplies: a vector-Jacobian product of a segment.

A segment is `fn(primals) -> outputs` over flat lists of tensors that also reads `variables`.
`linearize(fn, primals, variables)` runs `fn` once and returns its outputs and a `pullback`:
`pullback(cotangent_sets, want_primal_grads)` gives, for each set of output cotangents c,
`(d_variables, d_primals)` = (dOut/dW)^T c, (dOut/dprimals)^T c. No Jacobian is ever formed: each
product is one ordinary backward pass, seeded with c as `output_gradients` (eager) or `grad_ys`
(graph). `vjp(...)` is the two in one call, for segments that are recomputed in the backward pass;
keeping the pullback instead keeps the segment's activations alive until it is called.

A cotangent entry of None means "this output is not differentiated" (cheaper than a zero seed);
an output of None is never differentiated. Gradients that do not reach a source come back as
zeros, filled in here rather than with `unconnected_gradients`, whose behaviour has changed
between TensorFlow releases.
"""

from typing import Callable, Sequence

import tensorflow as tf

from tbptt._src import compat

BACKENDS = ("eager", "graph")

SegmentFn = Callable[[list], list]
Pullback = Callable[[Sequence, Sequence[bool]], list]


def _targets(outputs: list, cotangents: Sequence) -> tuple[list, list]:
    """The (output, cotangent) pairs that take part: both present."""
    pairs = [(y, c) for y, c in zip(outputs, cotangents) if c is not None and y is not None]
    return [y for y, _ in pairs], [tf.cast(c, y.dtype) for y, c in pairs]


def _zeros_for_none(grads: Sequence, sources: Sequence) -> list:
    """Dense gradients: None (unconnected) becomes zeros, IndexedSlices become tensors."""
    return [
        tf.zeros_like(s) if g is None else tf.convert_to_tensor(g)
        for g, s in zip(grads, sources)
    ]


def _split(grads: list, num_variables: int, want_primals: bool):
    return grads[:num_variables], (grads[num_variables:] if want_primals else None)


def tape_linearize(fn: SegmentFn, primals: list, variables: list, persistent: bool = False):
    """Eager backend: `tf.GradientTape.gradient(..., output_gradients=...)`.

    Works executing eagerly and inside a `tf.function`. `persistent` allows the pullback to be
    called with several cotangent sets or several times.
    """
    with tf.GradientTape(persistent=persistent) as tape:
        # A fresh identity per primal: two equal entries (say zeros for h and c) get separate
        # gradients.
        primals = [tf.identity(p) for p in primals]
        tape.watch(primals)
        outputs = fn(primals)

    def pullback(cotangent_sets: Sequence, want_primal_grads: Sequence[bool]) -> list:
        results = []
        for cotangents, want_primals in zip(cotangent_sets, want_primal_grads):
            ys, seeds = _targets(outputs, cotangents)
            sources = list(variables) + (primals if want_primals else [])
            grads = tape.gradient(ys, sources, output_gradients=seeds) if ys else [None] * len(
                sources)
            results.append(_split(_zeros_for_none(grads, sources), len(variables), want_primals))
        return results

    return outputs, pullback


def graph_vjp(ys: list, cotangents: Sequence, variables: list, primals: list,
              stop_at_primals: bool = False):
    """One product on tensors already in a graph: `tf.gradients(..., grad_ys=...)`.

    Args:
      ys: output tensors; cotangents: one seed each, or None to leave that output out.
      variables: variables to differentiate (Keras 3 variables are unwrapped).
      primals: tensors to differentiate; `stop_at_primals` also stops back-propagation there
        (`stop_gradients`), so the product covers only the graph between primals and outputs.

    Returns:
      ``(d_variables, d_primals)``, zeros where an output does not reach a source.
    """
    ys, seeds = _targets(ys, cotangents)
    sources = [compat.tf_variable(v) for v in variables] + list(primals)
    if not ys:
        return _split(_zeros_for_none([None] * len(sources), sources), len(variables), True)
    grads = tf.gradients(ys, sources, grad_ys=seeds,
                         stop_gradients=list(primals) if stop_at_primals else None)
    return _split(_zeros_for_none(grads, sources), len(variables), True)


def gradients_linearize(fn: SegmentFn, primals: list, variables: list, persistent: bool = False):
    """Graph backend: `tf.gradients(ys, xs, grad_ys=...)`; must run while building a graph."""
    del persistent  # tf.gradients can always be called again on the same graph
    if tf.executing_eagerly():
        raise RuntimeError("backend='graph' needs graph mode: run it inside a tf.function.")
    primals = [tf.identity(p) for p in primals]
    outputs = fn(primals)

    def pullback(cotangent_sets: Sequence, want_primal_grads: Sequence[bool]) -> list:
        results = []
        for cotangents, want_primals in zip(cotangent_sets, want_primal_grads):
            d_vars, d_primals = graph_vjp(outputs, cotangents, variables,
                                          primals if want_primals else [])
            results.append((d_vars, d_primals if want_primals else None))
        return results

    return outputs, pullback


def get_linearize(backend: str):
    """`linearize(fn, primals, variables, persistent) -> (outputs, pullback)` for `backend`."""
    return {"eager": tape_linearize, "graph": gradients_linearize}[backend]


def get_vjp(backend: str):
    """`vjp(fn, primals, variables, cotangent_sets, want_primal_grads) -> (outputs, results)`:
    forward and pullback in one call, for a segment recomputed in the backward pass."""
    linearize = get_linearize(backend)

    def vjp(fn: SegmentFn, primals: list, variables: list, cotangent_sets: Sequence,
            want_primal_grads: Sequence[bool]):
        outputs, pullback = linearize(fn, primals, variables,
                                      persistent=len(cotangent_sets) > 1)
        return outputs, pullback(cotangent_sets, want_primal_grads)

    return vjp


# The backends' VJPs under their own names, for callers that pick one directly.
tape_vjp = get_vjp("eager")
gradients_vjp = get_vjp("graph")
