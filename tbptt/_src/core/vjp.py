"""The one thing a backend supplies: a vector-Jacobian product of a segment.

A segment is `fn(primals) -> outputs` over flat lists of tensors that also reads `variables`.
`linearize(fn, primals, variables)` runs `fn` once and returns its outputs and a `pullback`:
`pullback(cotangent_sets, want_primal_grads[, alive])` gives, for each set of output cotangents
c, `(d_variables, d_primals)` = (dOut/dW)^T c, (dOut/dprimals)^T c. No Jacobian is ever formed:
each product is one ordinary backward pass, seeded with c as `output_gradients` (eager) or
`grad_ys` (graph); a set whose `alive` entry (a bool scalar) is False is known to be zero, and
gets zeros without a backward pass (`tf.cond`). Keeping the pullback keeps the segment's
activations alive until it is called; a segment recomputed in the backward pass is linearized
there.

A cotangent entry of None means "this output is not differentiated" (cheaper than a zero seed);
an output of None is never differentiated. Gradients that do not reach a source come back as
zeros, filled in here rather than with `unconnected_gradients`, whose behaviour has changed
between TensorFlow releases. A variable marked sparse (an embedding table) keeps its
`IndexedSlices`, one row per lookup (no rows where unconnected), and then no set is skipped.
"""

from collections.abc import Callable, Sequence

import tensorflow as tf

from tbptt._src.core import compat

BACKENDS = ("eager", "graph")

SegmentFn = Callable[[list], list]
# pullback(cotangent_sets, want_primal_grads, alive=None) -> [(d_variables, d_primals)]
Pullback = Callable[..., list]
# gradient(ys, sources, seeds) -> one gradient (or None) per source.
Gradient = Callable[[list, list, list], list]


def _targets(outputs: list, cotangents: Sequence) -> tuple[list, list]:
    """The (output, cotangent) pairs that take part: both present."""
    pairs = [(y, c) for y, c in zip(outputs, cotangents) if c is not None and y is not None]
    return [y for y, _ in pairs], [tf.cast(c, y.dtype) for y, c in pairs]


def _zeros_for_none(grads: Sequence, sources: Sequence, sparse: Sequence) -> list:
    """Dense gradients: None (unconnected) becomes zeros, IndexedSlices become tensors; where
    `sparse` says so, `IndexedSlices` (no rows for None, every row for a dense gradient)."""
    return [
        _sparse(g, s) if is_sparse else tf.zeros_like(s) if g is None else tf.convert_to_tensor(g)
        for g, s, is_sparse in zip(grads, sources, sparse)
    ]


def _sparse(grad, source) -> tf.IndexedSlices:
    """A sparse variable's gradient as `IndexedSlices`: a dense one (a table also read otherwise
    than by lookups) as every row once."""
    if isinstance(grad, tf.IndexedSlices):
        return grad
    shape = tf.constant(source.shape.as_list(), tf.int64)
    if grad is None:
        empty = tf.zeros([0] + source.shape.as_list()[1:], tf.as_dtype(source.dtype))
        return tf.IndexedSlices(empty, tf.zeros([0], tf.int32), shape)
    grad = tf.convert_to_tensor(grad)
    return tf.IndexedSlices(grad, tf.range(tf.shape(grad)[0]), shape)


def pullback_of(
    outputs: list,
    variables: Sequence,
    primals: Sequence,
    gradient: Gradient,
    skips: bool = True,
    sparse: Sequence = (),
) -> Pullback:
    """The pullback of `outputs` with respect to `variables` and `primals`, for one backend's
    `gradient`: one backward pass per cotangent set, d_primals only where wanted (else None).
    `skips`: whether a set known to be zero may skip its pass inside a `tf.cond` branch (the
    backend's `gradient` must then work inside a branch). `sparse` (per variable): the gradient
    stays `IndexedSlices`, the same rows for every set (none skipped: they add row by row)."""
    variables, primals = list(variables), list(primals)
    sparse = list(sparse) + [False] * (len(variables) + len(primals) - len(sparse))
    skips = skips and not any(sparse)

    def product(cotangents, want_primals: bool) -> list:
        ys, seeds = _targets(outputs, cotangents)
        sources = variables + (primals if want_primals else [])
        grads = gradient(ys, sources, seeds) if ys else [None] * len(sources)
        return _zeros_for_none(grads, sources, sparse)

    def pullback(
        cotangent_sets: Sequence, want_primal_grads: Sequence[bool], alive: Sequence | None = None
    ) -> list:
        # A tape that may take a second derivative through the pullback (a user's persistent
        # or nested tape while a function is traced) cannot differentiate through a branch
        # that takes a gradient: then every set is pulled back.
        skip = (
            skips
            and alive is not None
            and not compat.second_order_recording([y for y in outputs if y is not None], variables)
        )
        results = []
        for index, (cotangents, want_primals) in enumerate(zip(cotangent_sets, want_primal_grads)):
            live = alive[index] if skip and alive is not None else None
            if live is None:
                grads = product(cotangents, want_primals)
            else:  # a set that is zero (a bool scalar False) is not pulled back at all
                grads = tf.cond(
                    live,
                    lambda c=cotangents, w=want_primals: product(c, w),
                    lambda w=want_primals: _zeros(variables + (primals if w else [])),
                )
            d_vars, d_primals = grads[: len(variables)], grads[len(variables) :]
            results.append((d_vars, d_primals if want_primals else None))
        return results

    return pullback


def _zeros(sources: list) -> list:
    return [tf.zeros_like(s) for s in sources]


def tape_linearize(
    fn: SegmentFn, primals: list, variables: list, persistent: bool = False, sparse=()
):
    """Eager backend: `tf.GradientTape.gradient(..., output_gradients=...)`.

    Works executing eagerly and inside a `tf.function`. `persistent` allows the pullback to be
    called with several cotangent sets or several times; `sparse`: see `pullback_of`.
    """
    with tf.GradientTape(persistent=persistent) as tape:
        # A fresh identity per primal: two equal entries (say zeros for h and c) get separate
        # gradients.
        primals = [tf.identity(p) for p in primals]
        tape.watch(primals)
        outputs = fn(primals)

    def gradient(ys, sources, seeds):
        return tape.gradient(ys, sources, output_gradients=seeds)

    return outputs, pullback_of(outputs, variables, primals, gradient, sparse=sparse)


def graph_pullback(
    outputs: list,
    variables: Sequence,
    primals: Sequence,
    stop_at_primals: bool = False,
    sparse: Sequence = (),
) -> Pullback:
    """`tf.gradients(ys, xs, grad_ys=...)` on tensors already in a graph.

    `stop_at_primals` also stops back-propagation at the primals (`stop_gradients`), so each
    product covers only the graph between the primals and the outputs: how a chunk of a TF1
    graph that already holds every chunk is cut out. Keras 3 variables are unwrapped, since
    `tf.gradients` differentiates with respect to `tf.Variable` handles only.
    """
    stop = list(primals) if stop_at_primals else None

    def gradient(ys, sources, seeds):
        sources = [compat.tf_variable(s) for s in sources]
        return tf.gradients(ys, sources, grad_ys=seeds, stop_gradients=stop)

    # No skipping: inside a branch function, `tf.gradients` sees the outputs as captured
    # inputs, with no path back to the sources, and returns zeros.
    return pullback_of(outputs, variables, primals, gradient, skips=False, sparse=sparse)


def gradients_linearize(
    fn: SegmentFn, primals: list, variables: list, persistent: bool = False, sparse=()
):
    """Graph backend: `tf.gradients(ys, xs, grad_ys=...)`; must run while building a graph."""
    del persistent  # tf.gradients can always be called again on the same graph
    if tf.executing_eagerly():
        raise RuntimeError("backend='graph' needs graph mode: run it inside a tf.function.")
    primals = [tf.identity(p) for p in primals]
    outputs = fn(primals)
    return outputs, graph_pullback(outputs, variables, primals, sparse=sparse)


def get_linearize(backend: str):
    """`linearize(fn, primals, variables, persistent) -> (outputs, pullback)` for `backend`."""
    return {"eager": tape_linearize, "graph": gradients_linearize}[backend]
