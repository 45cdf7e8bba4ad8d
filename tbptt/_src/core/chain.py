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
cotangents back with one function, `step_back`. Which cotangents a segment receives and passes
on (all of them, or only the young ones under truncation) is the schedule's answer
(`schedules.py`, plain values), so the loops do not know about truncation. What a run records
beside the loss and gradients (a carry to keep, NaN findings, cotangent norms) is a `Record`.

The loops over segments of one shape are `tf.while_loop`s with the boundary values in
`TensorArray`s, so in a `tf.function` one trace serves any number of segments; executing
eagerly they run as Python loops. Segments whose carried values differ in shape (the stages of
a CNN, the chunks of a TF1 graph) use `static_forward` and `static_backward`, the same chain
unrolled over a fixed list.

With `check_numerics`, every segment's carry, loss, carry cotangent and variable gradients are
tested for NaN/Inf as they are made (one `reduce_all(is_finite)` per tensor); the chain returns
`non_finite`: per kind, the index of the segment where a non-finite value first appeared (see
`NUMERICS_KINDS`; -1 where none did). The caller decides how to report it.
"""

from typing import Callable, NamedTuple, Optional, Sequence

import tensorflow as tf

from tbptt._src.core import checks
from tbptt._src.core import chunking

# Segments run one after the other anyway (each needs the carry of the one before), but a
# while_loop may start up to `parallel_iterations` iterations' carry-independent work early: the
# backward's recompute of segments ahead, each holding its activations. Two lets one segment's
# recompute overlap the previous one's backward; the default (10) would keep ten alive.
PARALLEL_SEGMENTS = 2

Advance = Callable[[tf.Tensor, list], list]
Segment = Callable[[tf.Tensor, list], tuple]
# A segment of a static chain, linearized: () -> (outputs [loss or None, *carry], pullback).
Linearized = Callable[[], tuple]


class Segments(NamedTuple):
    """A chain of `count` segments over a flat list of carried tensors.

    `bound` (None: `count`) is a bound of `count` that XLA can evaluate when it compiles the
    loops (the chunk count of a group of the two-level chain is not): it sizes the loops'
    TensorArrays and iteration counts inside a user's `jit_compile=True`.

    `live` (None: every loss counts) says which segments' losses count (a bool scalar): the
    backward then follows which carried cotangents may be non-zero and pulls back only those
    (a streaming window's context chunks add no loss of their own).
    """

    count: tf.Tensor
    advance: Advance
    segment: Segment
    bound: Optional[tf.Tensor] = None
    live: Optional[Callable[[tf.Tensor], tf.Tensor]] = None  # k -> does segment k's loss count

    @property
    def most(self) -> tf.Tensor:
        return self.count if self.bound is None else self.bound


class ChainGradients(NamedTuple):
    loss: tf.Tensor
    grads: list
    final_carry: list
    initial_carry_grad: list
    kept_carry: Optional[list] = None  # the carry entering segment `keep_carry_at`
    non_finite: Optional[tf.Tensor] = None  # [len(NUMERICS_KINDS)] int32, see `check_numerics`
    carry_grad_norms: Optional[tf.Tensor] = None  # [n, ages], see `record_carry_grads`


class Record(NamedTuple):
    """What a run records beside the loss and gradients.

    Attributes:
      carry_at: a segment index j in [0, n]: the carry entering segment j is returned as
        `kept_carry` (streaming keeps the state where its context window starts); None: none.
      non_finite: test every segment's values for NaN/Inf and return `non_finite`.
      carry_grad_norms: return ``[n, ages]``: the norm of the cotangent carried into the cut
        before segment k, per age (diagnostics).
    """

    carry_at: Optional[tf.Tensor] = None
    non_finite: bool = False
    carry_grad_norms: bool = False


def _added(grads: list, d_vars: list) -> list:
    """The running sum of the variables' gradients over segments."""
    return [g + d for g, d in zip(grads, d_vars)]


def _zeros(tensors: list) -> list:
    return [tf.zeros_like(t) for t in tensors]


def loss_dtype_for(dtype: tf.DType) -> tf.DType:
    """The dtype losses are accumulated in: float64 for a float64 chain, else float32 (16-bit
    chunk losses would lose the small ones in the sum)."""
    return tf.float64 if tf.as_dtype(dtype) == tf.float64 else tf.float32


# -- non-finite values -----------------------------------------------------------------------------

# What check_numerics watches, in the order of `non_finite`. A carry and a loss are made in the
# forward order, so the first one is the lowest segment index; cotangents and variable gradients
# are made in the backward order, so the first one is the highest.
NUMERICS_KINDS = checks.NUMERICS_KINDS
_FIRST_IS_LOWEST = (True, True, False, False)


def no_findings() -> tf.Tensor:
    return tf.fill([len(NUMERICS_KINDS)], -1)


def _all_finite(tensors: list) -> tf.Tensor:
    flags = [tf.reduce_all(tf.math.is_finite(t)) for t in tensors
             if t is not None and t.dtype.is_floating]
    return tf.reduce_all(tf.stack(flags)) if flags else tf.constant(True)


def note_non_finite(found: tf.Tensor, k, **values) -> tf.Tensor:
    """`found` updated with segment `k`'s values, given by kind (`state=[...]`, `loss=[...]`:
    the carried value, a stage's activation in a static chain, is a "state")."""
    new = tf.stack([tf.where(_all_finite(values[kind]), -1, tf.cast(k, tf.int32))
                    if kind in values else tf.constant(-1) for kind in NUMERICS_KINDS])
    return merge_non_finite(found, new)


def merge_non_finite(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """Two findings joined (in any order): per kind the first segment, -1 for none."""
    lowest = tf.where((a < 0) | ((b >= 0) & (b < a)), b, a)
    return tf.where(tf.constant(_FIRST_IS_LOWEST), lowest, tf.maximum(a, b))


def offset_non_finite(found: tf.Tensor, first) -> tf.Tensor:
    """Findings of a sub-chain that starts at segment `first`, in the outer chain's indices."""
    return tf.where(found >= 0, found + tf.cast(first, tf.int32), found)


def _note_if(check: bool, found: tf.Tensor, k, **values) -> tf.Tensor:
    return note_non_finite(found, k, **values) if check else found


# -- the one backward step -------------------------------------------------------------------------


def step_back(outputs: list, pullback, carried: list, schedule) -> tuple[list, list]:
    """Pulls the cotangents one segment receives back through it.

    Args:
      outputs: the segment's flat outputs ``[loss or None, *carry_out]``.
      pullback: the backend's pullback at those outputs (see `vjp.py`).
      carried: the cotangents of `carry_out` the segment receives, by age (one list of tensors
        per age; see the schedule's `seeds`).
      schedule: says which seeds to pull back and which cotangents to pass on.

    Returns:
      ``(d_variables, carried cotangents of carry_in by age)``: the segment's own loss is seeded
      with 1, and the ages the schedule drops are not pulled back to carry_in.
    """
    seeds, want = schedule.seeds(carried, len(outputs) - 1)
    return _summed(pullback(seeds, want))


def step_back_live(outputs: list, pullback, carried: list, schedule, loss_live,
                   carried_live: list) -> tuple[list, list, list]:
    """`step_back`, where the seed sets known to be zero are not pulled back.

    Args:
      loss_live: whether the segment's own loss counts (a bool scalar).
      carried_live: whether each of `carried` may be non-zero (bool scalars, by age).

    Returns:
      `step_back`'s, and whether each cotangent passed on may be non-zero.
    """
    seeds, want = schedule.seeds(carried, len(outputs) - 1)
    alive = schedule.live_sets(loss_live, carried_live)
    d_vars, carried = _summed(pullback(seeds, want, alive))
    return d_vars, carried, [a for a, w in zip(alive, want) if w]


def _summed(results: list) -> tuple[list, list]:
    """The variables' gradient summed over the seed sets, and the carry cotangents passed on."""
    d_vars = [tf.add_n(list(parts)) for parts in zip(*[d for d, _ in results])]
    return d_vars, [d for _, d in results if d is not None]


def _flat(loss_and_carry) -> list:
    loss, carry = loss_and_carry
    return [loss] + list(carry)


def _linearize_segment(segments: Segments, k, carry: list, variables: list, linearize,
                       schedule):
    return linearize(lambda c: _flat(segments.segment(k, c)), carry, variables,
                     persistent=schedule.seed_count > 1)


# -- the chunked gradient of a chain ---------------------------------------------------------------


def gradients(segments: Segments, carry: list, variables: list, linearize, schedule, *,
              loss_dtype: tf.DType, final_carry_grad: Optional[list] = None,
              record: Record = Record()) -> ChainGradients:
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

    Returns:
      `ChainGradients`, grads aligned with `variables`, the carries as flat lists.
    """
    if not schedule.carried_ages:  # nothing crosses a cut: each backward right after its forward
        if record.carry_at is not None or record.carry_grad_norms:
            raise ValueError(KEEP_NEEDS_CARRIED_MSG)
        return _one_sweep(segments, carry, variables, linearize, schedule, loss_dtype,
                          record.non_finite)
    if schedule.grouped:
        if record.carry_at is not None or record.carry_grad_norms:
            raise ValueError(KEEP_NEEDS_CARRIED_MSG)
        return _two_levels(segments, carry, variables, linearize, schedule, loss_dtype,
                           final_carry_grad, record.non_finite)
    return _forward_backward(segments, carry, variables, linearize, schedule, loss_dtype,
                             final_carry_grad, record)


KEEP_NEEDS_CARRIED_MSG = ("keeping a carry and recording cotangent norms need the one-level "
                          "chain with a carried cotangent.")


def _forward_backward(segments, carry, variables, linearize, schedule, loss_dtype,
                      final_carry_grad, record: Record) -> ChainGradients:
    # The sweep stops before the last segment, whose recompute (the backward's first step)
    # gives the final carry: one segment's forward less. A kept carry may be the final one.
    last = segments.count - 1
    carry_out, boundaries, kept, found = forward(segments, carry, keep_at=record.carry_at,
                                                 check=record.non_finite, stop=last)
    boundaries = [ta.write(last, c) for ta, c in zip(boundaries, carry_out)]
    carried = schedule.initial_carried(list(_zeros(carry_out) if final_carry_grad is None
                                            else final_carry_grad))
    # Where a segment is pulled back with several seed sets (truncation's ages) or some losses
    # do not count, the backward follows which cotangents may be non-zero: the one from
    # outside (the youngest) if given, the older ones start at zero.
    alive = None if segments.live is None and schedule.seed_count == 1 else [
        tf.constant(final_carry_grad is not None and age == 0) for age in range(len(carried))]
    back = backward(segments, boundaries, carried, variables, linearize, schedule, loss_dtype,
                    check=record.non_finite, found=found, record=record.carry_grad_norms,
                    alive=alive)
    if record.carry_at is not None:
        kept = [tf.where(tf.equal(record.carry_at, segments.count), f, s)
                for f, s in zip(back.final_carry, kept)]
    initial_carry_grad = [tf.add_n(list(ages)) for ages in zip(*back.carried)]
    return ChainGradients(back.loss, back.grads, back.final_carry, initial_carry_grad, kept,
                          back.non_finite if record.non_finite else None, back.carry_grad_norms)


def _two_levels(segments, carry, variables, linearize, schedule, loss_dtype, final_carry_grad,
                check: bool) -> ChainGradients:
    """The exact gradient keeping only every `group`-th boundary: the coarse chain's segments
    are groups of ~sqrt(n) segments; for each group in reverse, the one-level chain over its
    segments seeded with the carried cotangent is exactly the group's VJP. Memory n/G + G
    boundaries and one segment, for one more forward pass."""
    group = chunking.group_size_tensor(segments.count)
    groups = Segments((segments.count + group - 1) // group,
                      lambda j, c: forward(_group(segments, group, j), c, with_boundaries=False)[0], None)
    # The coarse forward is not checked: each group's chain re-runs (and checks) its segments.
    final_carry, boundaries, _, _ = forward(groups, carry)
    if final_carry_grad is None:
        final_carry_grad = _zeros(final_carry)

    def body(i, carried, grads, loss, found):
        j = groups.count - 1 - i
        inner = _forward_backward(_group(segments, group, j), [ta.read(j) for ta in boundaries],
                                  variables, linearize, schedule, loss_dtype, carried,
                                  Record(non_finite=check))
        if check:
            found = merge_non_finite(found, offset_non_finite(inner.non_finite, j * group))
        return (i + 1, inner.initial_carry_grad, _added(grads, inner.grads),
                loss + inner.loss, found)

    _, initial_carry_grad, grads, loss, found = tf.while_loop(
        lambda i, *_: i < groups.count, body,
        (tf.constant(0), list(final_carry_grad), _zeros(variables), tf.zeros([], loss_dtype),
         no_findings()),
        parallel_iterations=PARALLEL_SEGMENTS, maximum_iterations=groups.count)
    return ChainGradients(loss, grads, final_carry, initial_carry_grad,
                          non_finite=found if check else None)


def _group(segments: Segments, group, j) -> Segments:
    """Segments j*group .. (j+1)*group - 1 as a chain of their own (at most `group` of them)."""
    first = j * group
    return Segments(tf.minimum(group, segments.count - first),
                    lambda k, c: segments.advance(first + k, c),
                    lambda k, c: segments.segment(first + k, c), bound=group,
                    live=None if segments.live is None else lambda k: segments.live(first + k))


# -- loops over segments of one shape --------------------------------------------------------------


def forward(segments: Segments, carry: list, with_boundaries: bool = True, keep_at=None,
            check: bool = False, stop=None):
    """Runs `advance` over the segments before `stop` (None: all n).

    Returns s_stop, the TensorArrays of s_0 .. s_{stop-1} (None without `with_boundaries`),
    s_{keep_at}
    (None without it) and the non-finite findings. s_{keep_at} is selected as the loop passes it
    rather than read from the TensorArray: executing eagerly, a TensorArray element can be read
    only once.
    """
    boundaries = [tf.TensorArray(c.dtype, size=segments.most if with_boundaries else 0,
                                 element_shape=c.shape) for c in carry]
    kept = list(carry)

    def select(k, carry, kept):
        if keep_at is None:
            return kept
        return [tf.where(tf.equal(k, keep_at), c, s) for c, s in zip(carry, kept)]

    def body(k, carry, boundaries, kept, found):
        if with_boundaries:
            boundaries = [ta.write(k, c) for ta, c in zip(boundaries, carry)]
        kept = select(k, carry, kept)
        carry = list(segments.advance(k, carry))
        return k + 1, carry, boundaries, kept, _note_if(check, found, k, state=carry)

    stop = segments.count if stop is None else stop
    count, carry, boundaries, kept, found = tf.while_loop(
        lambda k, *_: k < stop, body,
        (tf.constant(0), list(carry), boundaries, kept, no_findings()),
        parallel_iterations=PARALLEL_SEGMENTS, maximum_iterations=segments.most)
    kept = select(count, carry, kept) if keep_at is not None else None
    return carry, (boundaries if with_boundaries else None), kept, found


class Backward(NamedTuple):
    loss: tf.Tensor
    grads: list
    carried: list  # the cotangents carried out of segment 0, by age
    non_finite: tf.Tensor
    carry_grad_norms: Optional[tf.Tensor]
    final_carry: list  # the last segment's carry out


def backward(segments: Segments, boundaries: list, carried: list, variables: list, linearize,
             schedule, loss_dtype: tf.DType, *, check: bool = False, found=None,
             record: bool = False, alive: Optional[list] = None) -> Backward:
    """Segments n-1 .. 0 in reverse: recompute each from its boundary, `step_back` through it;
    the carry out of the last segment comes from its recompute (the loop's first step: the
    forward sweep need not run it).

    With `record`, also the norms ``[n, ages]`` of the cotangents carried into each cut. With
    `alive` (bool scalars, one per age of `carried`: may it be non-zero?), the seed sets known
    to be zero are not pulled back (`step_back_live`; `segments.live` says which losses count).
    """
    norms = tf.TensorArray(loss_dtype, size=segments.count if record else 0,
                           element_shape=[len(carried)])

    def body(i, carried, alive, grads, loss, found, norms, last):
        k = segments.count - 1 - i  # segments in reverse
        outputs, pullback = _linearize_segment(segments, k, [ta.read(k) for ta in boundaries],
                                               variables, linearize, schedule)
        last = [tf.where(tf.equal(i, 0), o, s) for o, s in zip(outputs[1:], last)]
        found = _note_if(check, found, k, state=outputs[1:])  # the sweep did not run the last
        if alive:
            loss_live = tf.constant(True) if segments.live is None else segments.live(k)
            d_vars, carried, alive = step_back_live(outputs, pullback, carried, schedule,
                                                    loss_live, alive)
        else:
            d_vars, carried = step_back(outputs, pullback, carried, schedule)
        found = _note_if(check, found, k, loss=outputs[:1], state_grad=sum(carried, []),
                         grads=d_vars)
        if record:
            norms = norms.write(k, tf.stack([_norm(c, loss_dtype) for c in carried]))
        return (i + 1, carried, alive, _added(grads, d_vars),
                loss + tf.cast(outputs[0], loss_dtype), found, norms, last)

    _, carried, _, grads, loss, found, norms, last = tf.while_loop(
        lambda i, *_: i < segments.count, body,
        (tf.constant(0), carried, alive or [], _zeros(variables),
         tf.zeros([], loss_dtype), no_findings() if found is None else found, norms,
         _zeros(carried[0])),
        parallel_iterations=PARALLEL_SEGMENTS, maximum_iterations=segments.most)
    return Backward(loss, grads, carried, found, norms.stack() if record else None, last)


def _norm(tensors: list, dtype: tf.DType) -> tf.Tensor:
    """The Euclidean norm of a flat list of tensors taken together."""
    return tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(tf.cast(t, dtype))) for t in tensors]))


def _one_sweep(segments: Segments, carry: list, variables: list, linearize, schedule,
               loss_dtype: tf.DType, check: bool = False) -> ChainGradients:
    """A chain whose schedule carries no cotangent across a cut (truncation after one segment):
    each segment's backward runs right after its forward, in one sweep."""

    def body(k, carry, grads, loss, found):
        outputs, pullback = _linearize_segment(segments, k, carry, variables, linearize,
                                               schedule)
        d_vars, _ = step_back(outputs, pullback, [], schedule)
        found = _note_if(check, found, k, state=outputs[1:], loss=outputs[:1], grads=d_vars)
        return (k + 1, outputs[1:], _added(grads, d_vars), loss + tf.cast(outputs[0], loss_dtype),
                found)

    _, final_carry, grads, loss, found = tf.while_loop(
        lambda k, *_: k < segments.count, body,
        (tf.constant(0), list(carry), _zeros(variables),
         tf.zeros([], loss_dtype), no_findings()),
        parallel_iterations=PARALLEL_SEGMENTS, maximum_iterations=segments.most)
    return ChainGradients(loss, grads, final_carry, _zeros(carry),
                          non_finite=found if check else None)


def forward_outputs(count, output: Callable, carry: list, dtype: tf.DType, rank: int) -> tuple:
    """The plain forward over `count` segments, collecting what each puts out:
    `output(k, carry) -> (y_k [t_k, ...], carry)` of `rank` dims; returns
    ``(concat_k y_k, final carry)``."""
    outputs = tf.TensorArray(dtype, size=count, infer_shape=False,
                             element_shape=tf.TensorShape([None] * rank))

    def body(k, carry, outputs):
        y, carry = output(k, carry)
        return k + 1, list(carry), outputs.write(k, y)

    _, carry, outputs = tf.while_loop(lambda k, *_: k < count, body,
                                      (tf.constant(0), list(carry), outputs),
                                      maximum_iterations=count)
    return outputs.concat(), carry


# -- the static chain: a fixed list of segments of any shapes --------------------------------------


class StaticChainGradients(NamedTuple):
    loss: tf.Tensor
    grads: list
    carry_grads: list


def static_forward(segments: Sequence[Callable], carry: list, variables: Sequence[list],
                   linearize, *, recompute: bool, check: bool = False):
    """Runs `segments[k](carry) -> (loss_k or None, carry)` in order.

    Returns one `Linearized` per segment for `static_backward` (the pullback kept from this
    pass, or with `recompute` a re-run from the boundary value) and the non-finite findings.
    """
    linearized, found = [], no_findings()
    for k, (segment, segment_variables) in enumerate(zip(segments, variables)):
        fn = lambda c, f=segment: _flat(f(c))  # noqa: E731
        if recompute:
            outputs = fn(carry)
            linearized.append(lambda f=fn, c=carry, v=segment_variables: linearize(f, c, v))
        else:
            outputs, pullback = linearize(fn, carry, segment_variables)
            linearized.append(lambda kept=(outputs, pullback): kept)
        carry = outputs[1:]
        found = _note_if(check, found, k, state=carry, loss=outputs[:1])
    return linearized, found


def static_backward(linearized: Sequence[Linearized], schedule, loss_dtype: tf.DType,
                    final_carry_grad: Optional[list] = None) -> StaticChainGradients:
    """`step_back` through the linearized segments in reverse.

    Returns:
      `StaticChainGradients(loss, grads, carry_grads)`: grads one list per segment,
      carry_grads dLoss/d(carry entering segment k) for every k.
    """
    loss, grads, carry_grads = tf.zeros([], loss_dtype), [], []
    carried = None
    for linearize_k in reversed(linearized):
        outputs, pullback = linearize_k()
        if carried is None:
            carried = [final_carry_grad or [None] * (len(outputs) - 1)]
        d_vars, carried = step_back(outputs, pullback, carried, schedule)
        grads.insert(0, d_vars)
        carry_grads.insert(0, carried[0])
        if outputs[0] is not None:
            loss += tf.cast(outputs[0], loss_dtype)
    return StaticChainGradients(loss, grads, carry_grads)
