"""Forward and backward over a chain of segments, carrying a value across each cut.

```
forward:   s_0 -> [seg_1] -> s_1 -> ... -> [seg_n] -> s_n          (keep only the s_k)
backward:  g_n = final_carry_grad (or 0)
           for k = n .. 1:  (dW_k, g_{k-1}) = step_back(seg_k at s_{k-1}, seeds dL_k=1, ds_k=g_k)
           grads = sum_k dW_k ;  initial_carry_grad = g_0
```

Segments are given as two functions of the segment index `k` (0-based, a scalar tensor) and the
flat list of carried tensors: `advance(k, carry) -> carry` (the forward, no loss) and
`segment(k, carry) -> (loss_k, carry)` (what is differentiated). Only one segment's activations
are alive at a time; the price is one extra forward pass.

`gradients` is the one entry: it runs the loops the schedule asks for (forward then backward,
one sweep when no cotangent crosses a cut, or two levels of boundaries) and every loop pulls
cotangents back with one function, `segments.step_back`. Which cotangents a segment receives
and passes on (all of them, or only the young ones under truncation) is the schedule's answer
(`schedules.py`, plain values), so the loops do not know about truncation. What a run records
beside the loss and gradients (a carry to keep, NaN findings, cotangent norms) is a
`segments.Record`; the findings themselves are `numerics.py`'s.

The loops over segments of one shape are `tf.while_loop`s with the boundary values in
`TensorArray`s, so in a `tf.function` one trace serves any number of segments; executing
eagerly they run as Python loops. Segments whose carried values differ in shape (the stages of
a CNN, the chunks of a TF1 graph) use `static_forward` and `static_backward`, the same chain
unrolled over a fixed list.

With `check_numerics`, every segment's carry, loss, carry cotangent and variable gradients are
tested for NaN/Inf as they are made (one `reduce_all(is_finite)` per tensor); the chain returns
`non_finite`: per kind, the index of the segment where a non-finite value first appeared (see
`numerics.py`; -1 where none did). The caller decides how to report it.
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import tensorflow as tf

from tbptt._src.core import chunking, numerics
from tbptt._src.core import segments as segments_lib

# Segments run one after the other anyway (each needs the carry of the one before), but a
# while_loop may start up to `parallel_iterations` iterations' carry-independent work early: the
# backward's recompute of segments ahead, each holding its activations. Two lets one segment's
# recompute overlap the previous one's backward; the default (10) would keep ten alive.
PARALLEL_SEGMENTS = 2

# -- the chunked gradient of a chain ---------------------------------------------------------------


def gradients(
    segments: segments_lib.Segments,
    carry: list,
    variables: list,
    linearize,
    schedule,
    *,
    loss_dtype: tf.DType,
    final_carry_grad: list | None = None,
    record: segments_lib.Record = segments_lib.Record(),
    sparse: tuple = (),
) -> segments_lib.ChainGradients:
    """Total loss, d(loss)/d(variables) and d(loss)/d(carry) over the whole chain.

    ```
    forward:   s_k = advance_k(s_{k-1}), keeping s_0 .. s_{n-1}       (the schedule's levels)
    backward:  g = final_carry_grad;  for k = n-1 .. 0:  (dW_k, g) = step_back(segment_k, g)
    grads = sum_k dW_k;  initial_carry_grad = g  (summed over the ages that reach it)
    ```

    Args:
      segments: the chain, see `Segments`.
      carry: flat list of tensors, the value entering the first segment.
      variables: the variables to differentiate.
      linearize: the backend's `linearize` (see `vjp.py`).
      schedule: which cotangents travel (see `schedules.py`).
      loss_dtype: dtype of the loss accumulator.
      final_carry_grad: flat list, dLoss/d(final carry) from outside the chain (or None).
      record: what to record beside (see `Record`).
      sparse: per variable, whether its gradient is `IndexedSlices` (one row per lookup of
        an embedding table), summed over segments as `segments.Rows`.

    Returns:
      `ChainGradients`, grads aligned with `variables`, the carries as flat lists.
    """
    backprop = segments_lib.Backprop(variables, linearize, schedule, loss_dtype, tuple(sparse))
    if not schedule.carried_ages:  # nothing crosses a cut: each backward right after its forward
        _check_record_without_carry(record)
        return _one_sweep(segments, carry, backprop, record.non_finite)
    if schedule.grouped:
        _check_record_without_carry(record)
        return _two_levels(segments, carry, backprop, final_carry_grad, record.non_finite)
    return _forward_backward(segments, carry, backprop, final_carry_grad, record)


def _check_record_without_carry(record: segments_lib.Record) -> None:
    if record.carry_at is not None or record.carry_grad_norms:
        raise ValueError(
            "keeping a carry and recording cotangent norms need the one-level chain with a "
            "carried cotangent."
        )


def _forward_backward(
    segments, carry, backprop: segments_lib.Backprop, final_carry_grad, record
) -> segments_lib.ChainGradients:
    # The sweep stops before the last segment, whose recompute (the backward's first step)
    # gives the final carry: one segment's forward less. A kept carry may be the final one.
    last = segments.count - 1
    carry_out, boundaries, kept, found = forward(
        segments, carry, keep_at=record.carry_at, check=record.non_finite, stop=last
    )
    boundaries = [ta.write(last, c) for ta, c in zip(boundaries, carry_out)]
    outside = segments_lib.zeros(carry_out) if final_carry_grad is None else final_carry_grad
    carried = backprop.schedule.initial_carried(list(outside))
    # Where a segment is pulled back with several seed sets (truncation's ages) or some losses
    # do not count, the backward follows which cotangents may be non-zero: the one from
    # outside (the youngest) if given, the older ones start at zero.
    alive = None
    if segments.live is not None or backprop.schedule.seed_count > 1:
        alive = [
            tf.constant(final_carry_grad is not None and age == 0) for age in range(len(carried))
        ]
    back = backward(
        segments,
        boundaries,
        carried,
        backprop,
        check=record.non_finite,
        found=found,
        norms=record.carry_grad_norms,
        alive=alive,
    )
    if record.carry_at is not None:
        at_end = tf.equal(record.carry_at, segments.count)
        kept = [tf.where(at_end, f, s) for f, s in zip(back.final_carry, kept)]
    initial_carry_grad = [tf.add_n(list(ages)) for ages in zip(*back.carried)]
    non_finite = back.non_finite if record.non_finite else None
    return segments_lib.ChainGradients(
        back.loss,
        back.grads,
        back.final_carry,
        initial_carry_grad,
        kept,
        non_finite,
        back.carry_grad_norms,
    )


def _two_levels(
    segments, carry, backprop: segments_lib.Backprop, final_carry_grad, check: bool
) -> segments_lib.ChainGradients:
    """The exact gradient keeping only every `group`-th boundary: the coarse chain's segments
    are groups of ~sqrt(n) segments; for each group in reverse, the one-level chain over its
    segments seeded with the carried cotangent is exactly the group's VJP. Memory n/G + G
    boundaries and one segment, for one more forward pass."""
    group = chunking.group_size_tensor(segments.count)
    groups = segments_lib.Segments(
        (segments.count + group - 1) // group,
        lambda j, c: forward(_group(segments, group, j), c, with_boundaries=False)[0],
        None,
    )
    # The coarse forward is not checked: each group's chain re-runs (and checks) its segments.
    final_carry, boundaries, _, _ = forward(groups, carry)
    if final_carry_grad is None:
        final_carry_grad = segments_lib.zeros(final_carry)

    def body(i, carried, grads, loss, found):
        j = groups.count - 1 - i
        inner = _forward_backward(
            _group(segments, group, j),
            [ta.read(j) for ta in boundaries],
            backprop,
            carried,
            segments_lib.Record(non_finite=check),
        )
        if check:
            inner_found = numerics.offset_non_finite(inner.non_finite, j * group)
            found = numerics.merge_non_finite(found, inner_found)
        grads = segments_lib.added(grads, inner.grads, j)
        return i + 1, inner.initial_carry_grad, grads, loss + inner.loss, found

    start = (tf.constant(0), list(final_carry_grad)) + _sums(backprop, groups.count)
    _, initial_carry_grad, grads, loss, found = _loop(groups.count, body, start, groups.count)
    non_finite = found if check else None
    grads = segments_lib.totals(grads, backprop.variables)
    return segments_lib.ChainGradients(
        loss, grads, final_carry, initial_carry_grad, non_finite=non_finite
    )


def _sums(backprop: segments_lib.Backprop, size) -> tuple:
    """The sums a loop over `size` segments starts from: variables' gradients, loss, findings."""
    zero_loss = tf.zeros([], backprop.loss_dtype)
    grads = segments_lib.sums(backprop.variables, backprop.sparse, size)
    return grads, zero_loss, numerics.no_findings()


def _loop(count, body, start: tuple, most):
    """`tf.while_loop` over `count` segments (at most `most`: XLA sizes the loop with it)."""
    return tf.while_loop(
        lambda i, *_: i < count,
        body,
        start,
        parallel_iterations=PARALLEL_SEGMENTS,
        maximum_iterations=most,
    )


def _group(segments: segments_lib.Segments, group, j) -> segments_lib.Segments:
    """Segments j*group .. (j+1)*group - 1 as a chain of their own (at most `group` of them)."""
    first, live, segment = j * group, segments.live, segments.segment
    return segments_lib.Segments(
        tf.minimum(group, segments.count - first),
        lambda k, c: segments.advance(first + k, c),
        None if segment is None else lambda k, c: segment(first + k, c),
        bound=group,
        live=None if live is None else lambda k: live(first + k),
    )


# -- loops over segments of one shape --------------------------------------------------------------


def forward(
    segments: segments_lib.Segments,
    carry: list,
    with_boundaries: bool = True,
    keep_at=None,
    check: bool = False,
    stop=None,
):
    """Runs `advance` over the segments before `stop` (None: all n).

    Returns s_stop, the TensorArrays of s_0 .. s_{stop-1} (None without `with_boundaries`),
    s_{keep_at} (None without it) and the non-finite findings. s_{keep_at} is selected as the
    loop passes it rather than read from the TensorArray: executing eagerly, a TensorArray
    element can be read only once.
    """
    size = segments.most if with_boundaries else 0
    boundaries = [tf.TensorArray(c.dtype, size=size, element_shape=c.shape) for c in carry]

    def select(k, carry, kept):
        if keep_at is None:
            return kept
        return [tf.where(tf.equal(k, keep_at), c, s) for c, s in zip(carry, kept)]

    def body(k, carry, boundaries, kept, found):
        if with_boundaries:
            boundaries = [ta.write(k, c) for ta, c in zip(boundaries, carry)]
        kept = select(k, carry, kept)
        carry = list(segments.advance(k, carry))
        return k + 1, carry, boundaries, kept, numerics.note_if(check, found, k, state=carry)

    stop = segments.count if stop is None else stop
    start = (tf.constant(0), list(carry), boundaries, list(carry), numerics.no_findings())
    count, carry, boundaries, kept, found = _loop(stop, body, start, segments.most)
    kept = select(count, carry, kept) if keep_at is not None else None
    return carry, (boundaries if with_boundaries else None), kept, found


class Backward(NamedTuple):
    loss: tf.Tensor
    grads: list
    carried: list  # the cotangents carried out of segment 0, by age
    non_finite: tf.Tensor
    carry_grad_norms: tf.Tensor | None
    final_carry: list  # the last segment's carry out


def backward(
    segments: segments_lib.Segments,
    boundaries: list,
    carried: list,
    backprop: segments_lib.Backprop,
    *,
    check: bool = False,
    found=None,
    norms: bool = False,
    alive: list | None = None,
) -> Backward:
    """Segments n-1 .. 0 in reverse: recompute each from its boundary, `step_back` through it;
    the carry out of the last segment comes from its recompute (the forward sweep skips it).

    With `norms`, also the norms ``[n, ages]`` of the cotangents carried into each cut. With
    `alive` (bool scalars, one per age of `carried`: may it be non-zero?), the seed sets known
    to be zero are not pulled back (`step_back_live`; `segments.live` says which losses count).
    """
    dtype = backprop.loss_dtype
    written = tf.TensorArray(
        dtype, size=segments.count if norms else 0, element_shape=[len(carried)]
    )

    def body(i, carried, alive, grads, loss, found, written, last):
        k = segments.count - 1 - i  # segments in reverse
        boundary = [ta.read(k) for ta in boundaries]
        outputs, d_vars, carried, alive = segments_lib.pull_back(
            segments, k, boundary, carried, alive, backprop
        )
        last = [tf.where(tf.equal(i, 0), o, s) for o, s in zip(outputs[1:], last)]
        # the carry too: the forward sweep did not run the last segment
        state, state_grad = outputs[1:], sum(carried, [])
        found = numerics.note_if(
            check, found, k, state=state, loss=outputs[:1], state_grad=state_grad, grads=d_vars
        )
        if norms:
            written = written.write(k, tf.stack([_norm(c, dtype) for c in carried]))
        loss += tf.cast(outputs[0], dtype)
        grads = segments_lib.added(grads, d_vars, k)
        return i + 1, carried, alive, grads, loss, found, written, last

    variables_grads, zero_loss, no_findings = _sums(backprop, segments.count)
    found = no_findings if found is None else found
    last = segments_lib.zeros(carried[0])
    start = (tf.constant(0), carried, alive or [], variables_grads, zero_loss, found, written, last)
    _, carried, _, grads, loss, found, written, last = _loop(
        segments.count, body, start, segments.most
    )
    grads = segments_lib.totals(grads, backprop.variables)
    return Backward(loss, grads, carried, found, written.stack() if norms else None, last)


def _norm(tensors: list, dtype: tf.DType) -> tf.Tensor:
    """The Euclidean norm of a flat list of tensors taken together."""
    return tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(tf.cast(t, dtype))) for t in tensors]))


def _one_sweep(
    segments: segments_lib.Segments, carry: list, backprop: segments_lib.Backprop, check: bool
) -> segments_lib.ChainGradients:
    """A chain whose schedule carries no cotangent across a cut (truncation after one segment):
    each segment's backward runs right after its forward, in one sweep."""

    def body(k, carry, grads, loss, found):
        outputs, d_vars, _, _ = segments_lib.pull_back(segments, k, carry, [], None, backprop)
        found = numerics.note_if(check, found, k, state=outputs[1:], loss=outputs[:1], grads=d_vars)
        loss += tf.cast(outputs[0], backprop.loss_dtype)
        return k + 1, outputs[1:], segments_lib.added(grads, d_vars, k), loss, found

    start = (tf.constant(0), list(carry)) + _sums(backprop, segments.count)
    _, final_carry, grads, loss, found = _loop(segments.count, body, start, segments.most)
    grads = segments_lib.totals(grads, backprop.variables)
    non_finite = found if check else None
    return segments_lib.ChainGradients(
        loss, grads, final_carry, segments_lib.zeros(carry), non_finite=non_finite
    )


def forward_outputs(count, output: Callable, carry: list, dtype: tf.DType, rank: int) -> tuple:
    """The plain forward over `count` segments, collecting what each puts out:
    `output(k, carry) -> (y_k [t_k, ...], carry)` of `rank` dims; returns
    ``(concat_k y_k, final carry)``."""
    outputs = tf.TensorArray(
        dtype, size=count, infer_shape=False, element_shape=tf.TensorShape([None] * rank)
    )

    def body(k, carry, outputs):
        y, carry = output(k, carry)
        return k + 1, list(carry), outputs.write(k, y)

    _, carry, outputs = tf.while_loop(
        lambda k, *_: k < count,
        body,
        (tf.constant(0), list(carry), outputs),
        maximum_iterations=count,
    )
    return outputs.concat(), carry


# -- the static chain: a fixed list of segments of any shapes --------------------------------------


class StaticChainGradients(NamedTuple):
    loss: tf.Tensor
    grads: list
    carry_grads: list


def static_forward(
    segments: Sequence[Callable],
    carry: list,
    variables: Sequence[list],
    linearize,
    *,
    recompute: bool,
    check: bool = False,
):
    """Runs `segments[k](carry) -> (loss_k or None, carry)` in order.

    Returns one `Linearized` per segment for `static_backward` (the pullback kept from this
    pass, or with `recompute` a re-run from the boundary value) and the non-finite findings.
    """
    linearized: list = []
    found = numerics.no_findings()
    for k, (segment, segment_variables) in enumerate(zip(segments, variables)):
        fn = lambda c, f=segment: segments_lib.flat(f(c))  # noqa: E731
        if recompute:
            outputs = fn(carry)
            linearized.append(lambda f=fn, c=carry, v=segment_variables: linearize(f, c, v))
        else:
            outputs, pullback = linearize(fn, carry, segment_variables)
            linearized.append(lambda kept=(outputs, pullback): kept)
        carry = outputs[1:]
        found = numerics.note_if(check, found, k, state=carry, loss=outputs[:1])
    return linearized, found


def static_backward(
    linearized: Sequence[segments_lib.Linearized],
    schedule,
    loss_dtype: tf.DType,
    final_carry_grad: list | None = None,
) -> StaticChainGradients:
    """`step_back` through the linearized segments in reverse.

    Returns:
      `StaticChainGradients(loss, grads, carry_grads)`: grads one list per segment,
      carry_grads dLoss/d(carry entering segment k) for every k.
    """
    loss = tf.zeros([], loss_dtype)
    grads: list = []
    carry_grads: list = []
    carried = None
    for linearize_k in reversed(linearized):
        outputs, pullback = linearize_k()
        if carried is None:
            carried = [final_carry_grad or [None] * (len(outputs) - 1)]
        d_vars, carried = segments_lib.step_back(outputs, pullback, carried, schedule)
        grads.insert(0, d_vars)
        carry_grads.insert(0, carried[0])
        if outputs[0] is not None:
            loss += tf.cast(outputs[0], loss_dtype)
    return StaticChainGradients(loss, grads, carry_grads)
