"""Forward and backward over a chain of segments, carrying a value across each cut.

```
forward:   s_0 -> [seg_1] -> s_1 -> ... -> [seg_n] -> s_n          (keep only the s_k)
backward:  g_n = final_carry_grad (or 0)
           for k = n .. 1:  (dW_k, g_{k-1}) = VJP of seg_k at s_{k-1}, seeds (dL_k=1, ds_k=g_k)
           grads = sum_k dW_k ;  initial_carry_grad = g_0
```

Segments are given as two functions of the segment index `k` (0-based, a scalar tensor) and the
flat list of carried tensors: `advance(k, carry) -> carry` (the forward, no loss) and
`segment(k, carry) -> (loss_k, carry)` (what is differentiated). Only one segment's activations
are alive at a time; the price is one extra forward pass.

Truncation (`backprop_segments=m`): the cotangent that L_j sends back is dropped once it has
crossed m segments. The carried cotangent is then kept per age (how many segments it has
crossed): ages 1 .. m-1 travel on, and the oldest one is dropped at the next cut. With m = 1
nothing is carried at all, so each segment's backward runs right after its forward, in one sweep.

The loops are `tf.while_loop`s over segments with the boundary values in `TensorArray`s, so in a
`tf.function` one trace serves any number of segments; executing eagerly they run as Python loops.
Segments whose carried values differ in shape (the stages of a CNN) use
`static_value_and_gradients`, the same chain unrolled over a fixed list.

With `check_numerics`, every segment's carry, loss, carry cotangent and variable gradients are
tested for NaN/Inf as they are made (one `reduce_all(is_finite)` per tensor), and the chain
returns `non_finite`: per kind, the index of the segment where a non-finite value first appeared
(see `NUMERICS_KINDS`; -1 where none did). The caller decides how to report it.
"""

from typing import Callable, NamedTuple, Optional, Sequence

import tensorflow as tf

# Segments run one after the other anyway (each needs the carry of the one before), but a
# while_loop may start up to `parallel_iterations` iterations' carry-independent work early: the
# backward's recompute of segments ahead, each holding its activations. Two lets one segment's
# recompute overlap the previous one's backward; the default (10) would keep ten alive.
PARALLEL_SEGMENTS = 2

Advance = Callable[[tf.Tensor, list], list]
Segment = Callable[[tf.Tensor, list], tuple]
StageFn = Callable[[list], tuple]


class Segments(NamedTuple):
    """A chain of `count` segments over a flat list of carried tensors."""

    count: tf.Tensor
    advance: Advance
    segment: Segment


class ChainGradients(NamedTuple):
    loss: tf.Tensor
    grads: list
    final_carry: list
    initial_carry_grad: list
    kept_carry: Optional[list] = None  # the carry entering segment `keep_carry_at`
    non_finite: Optional[tf.Tensor] = None  # [len(NUMERICS_KINDS)] int32, see `check_numerics`
    carry_grad_norms: Optional[tf.Tensor] = None  # [n, ages], see `record_carry_grads`


# -- non-finite values -----------------------------------------------------------------------------

# What check_numerics watches, in the order of `non_finite`. A carry and a loss are made in the
# forward order, so the first one is the lowest segment index; cotangents and variable gradients
# are made in the backward order, so the first one is the highest.
NUMERICS_KINDS = ("carry", "loss", "carry_grad", "grads")
_FIRST_IS_LOWEST = (True, True, False, False)


def no_findings() -> tf.Tensor:
    return tf.fill([len(NUMERICS_KINDS)], -1)


def _all_finite(tensors: list) -> tf.Tensor:
    flags = [tf.reduce_all(tf.math.is_finite(t)) for t in tensors
             if t is not None and t.dtype.is_floating]
    return tf.reduce_all(tf.stack(flags)) if flags else tf.constant(True)


def note_non_finite(found: tf.Tensor, k, **values) -> tf.Tensor:
    """`found` updated with segment `k`'s values, given by kind (`carry=[...]`, `loss=[...]`)."""
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


def value_and_gradients(segments: Segments, carry: list, variables: list, vjp, *,
                        loss_dtype: tf.DType, backprop_segments: Optional[int] = None,
                        final_carry_grad: Optional[list] = None,
                        group: Optional[tf.Tensor] = None,
                        keep_carry_at: Optional[tf.Tensor] = None, check_numerics: bool = False,
                        record_carry_grads: bool = False) -> ChainGradients:
    """Total loss, d(loss)/d(variables) and d(loss)/d(carry) over the whole chain.

    Args:
      segments: the chain, see `Segments`.
      carry: flat list of tensors, the value entering the first segment.
      variables: the variables to differentiate.
      vjp: the backend's VJP primitive (see `vjp.py`).
      loss_dtype: dtype of the loss accumulator.
      backprop_segments: None for the exact gradient, m >= 1 for truncation after m segments.
      final_carry_grad: flat list, dLoss/d(final carry) from outside the chain (or None).
      group: exact mode only: None keeps every segment boundary (memory n boundaries + one
        segment); a scalar G keeps every G-th one and re-runs each group of G segments as a
        chain of its own in the backward pass (memory n/G + G boundaries + one segment, for one
        more forward pass; see `_two_level`).
      keep_carry_at: a segment index j in [0, n]: the carry entering segment j (s_j) is
        returned as `kept_carry` (streaming keeps the state where its context window starts).
        Not with `group` or `backprop_segments=1`.
      check_numerics: test every segment's values for NaN/Inf and return `non_finite`.
      record_carry_grads: return `carry_grad_norms` ``[n, ages]``: the norm of the cotangent
        carried into the cut before segment k, per age (exact: one column, the whole
        dLoss/d(carry); truncated with m >= 2: column a-1 holds what the loss a segments on
        sends back). Not with `group` or `backprop_segments=1`.

    Returns:
      `ChainGradients(loss, grads, final_carry, initial_carry_grad, kept_carry, non_finite,
      carry_grad_norms)`, grads aligned with `variables`, the carries as flat lists.
    """
    if (keep_carry_at is not None or record_carry_grads) and (
            group is not None or backprop_segments == 1):
        raise ValueError("keep_carry_at and record_carry_grads need the one-level chain with a "
                         "carried cotangent.")
    if group is not None:
        return _two_level(segments, carry, variables, vjp, loss_dtype, group, final_carry_grad,
                          check_numerics)
    if backprop_segments == 1:
        return _truncated_one_sweep(segments, carry, variables, vjp, loss_dtype, check_numerics)
    final_carry, boundaries, kept, found = _forward(segments, carry, keep_at=keep_carry_at,
                                                    check=check_numerics)
    if final_carry_grad is None:
        final_carry_grad = [tf.zeros_like(c) for c in final_carry]
    ages = 1 if backprop_segments is None else backprop_segments - 1
    zeros = [[tf.zeros_like(c) for c in carry] for _ in range(ages - 1)]
    carried = [list(final_carry_grad)] + zeros  # one cotangent per age, youngest first
    loss, grads, carried, found, norms = _backward(
        segments, boundaries, variables, vjp, loss_dtype, carried,
        exact=backprop_segments is None, check=check_numerics, found=found,
        record=record_carry_grads)
    initial_carry_grad = [tf.add_n(list(leaves)) for leaves in zip(*carried)]
    return ChainGradients(loss, grads, final_carry, initial_carry_grad, kept,
                          found if check_numerics else None, norms)


def _forward(segments: Segments, carry: list, keep: bool = True, keep_at=None,
             check: bool = False):
    """Runs `advance` over all segments.

    Returns s_n, the TensorArrays of s_0 .. s_{n-1} (None with keep=False), s_{keep_at}
    (None without it) and the non-finite findings. s_{keep_at} is selected as the loop passes it
    rather than read from the TensorArray: executing eagerly, a TensorArray element can be read
    only once.
    """
    boundaries = [tf.TensorArray(c.dtype, size=segments.count if keep else 0,
                                 element_shape=c.shape) for c in carry]
    kept = list(carry)

    def select(k, carry, kept):
        if keep_at is None:
            return kept
        return [tf.where(tf.equal(k, keep_at), c, s) for c, s in zip(carry, kept)]

    def body(k, carry, boundaries, kept, found):
        if keep:
            boundaries = [ta.write(k, c) for ta, c in zip(boundaries, carry)]
        kept = select(k, carry, kept)
        carry = list(segments.advance(k, carry))
        return k + 1, carry, boundaries, kept, _note_if(check, found, k, carry=carry)

    count, carry, boundaries, kept, found = tf.while_loop(
        lambda k, *_: k < segments.count, body,
        (tf.constant(0), list(carry), boundaries, kept, no_findings()),
        parallel_iterations=PARALLEL_SEGMENTS)
    kept = select(count, carry, kept) if keep_at is not None else None
    return carry, (boundaries if keep else None), kept, found


def _two_level(segments: Segments, carry: list, variables: list, vjp, loss_dtype, group,
               final_carry_grad, check: bool):
    """Exact gradient keeping only every `group`-th boundary (two-level checkpointing).

    The coarse chain's segments are groups of `group` segments. Its forward keeps the group
    boundaries; its backward runs, for each group in reverse, the one-level exact chain over that
    group's segments seeded with the carried cotangent, which is exactly the group's VJP.
    """
    count = segments.count

    def sub_chain(j) -> Segments:
        first = j * group
        return Segments(tf.minimum(group, count - first),
                        lambda k, c: segments.advance(first + k, c),
                        lambda k, c: segments.segment(first + k, c))

    def advance_group(j, carry):
        return _forward(sub_chain(j), carry, keep=False)[0]

    # The coarse forward is not checked: each group's chain re-runs (and checks) its segments.
    groups = Segments((count + group - 1) // group, advance_group, None)
    final_carry, boundaries, _, _ = _forward(groups, carry)
    if final_carry_grad is None:
        final_carry_grad = [tf.zeros_like(c) for c in final_carry]

    def body(i, carried, grads, loss, found):
        j = groups.count - 1 - i
        inner = value_and_gradients(sub_chain(j), [ta.read(j) for ta in boundaries], variables,
                                    vjp, loss_dtype=loss_dtype, final_carry_grad=carried,
                                    check_numerics=check)
        grads = [g + d for g, d in zip(grads, inner.grads)]
        if check:
            found = merge_non_finite(found, offset_non_finite(inner.non_finite, j * group))
        return i + 1, inner.initial_carry_grad, grads, loss + inner.loss, found

    _, initial_carry_grad, grads, loss, found = tf.while_loop(
        lambda i, *_: i < groups.count, body,
        (tf.constant(0), list(final_carry_grad), [tf.zeros_like(v) for v in variables],
         tf.zeros([], loss_dtype), no_findings()), parallel_iterations=PARALLEL_SEGMENTS)
    return ChainGradients(loss, grads, final_carry, initial_carry_grad,
                          non_finite=found if check else None)


def _cotangent_sets(carried: list, num_leaves: int, exact: bool):
    """The VJP seeds of one segment, and whether each needs d(carry_in).

    Exact: one seed, (dL = 1, ds = g). Truncated: the own loss (age 0) and each carried age
    separately, because their input cotangents must stay apart to be aged; the oldest age only
    contributes to dW, its input cotangent is the one being dropped.
    """
    if exact:
        return [[1.0] + carried[0]], [True]
    seeds = [[1.0] + [None] * num_leaves] + [[None] + ages for ages in carried]
    return seeds, [True] * (len(seeds) - 1) + [False]


def _backward(segments: Segments, boundaries: list, variables: list, vjp, loss_dtype,
              carried: list, exact: bool, check: bool, found: tf.Tensor, record: bool):
    """Segments n-1 .. 0 in reverse: recompute each, pull the carried cotangents through it.

    Returns the loss, grads, the cotangents carried out of segment 0, the findings and (with
    `record`) the carried cotangents' norms ``[n, ages]``.
    """
    num_leaves = len(boundaries)
    norms = tf.TensorArray(loss_dtype, size=segments.count if record else 0,
                           element_shape=[len(carried)])

    def body(i, carried, grads, loss, found, norms):
        k = segments.count - 1 - i  # segments in reverse
        carry_in = [ta.read(k) for ta in boundaries]
        seeds, want = _cotangent_sets(carried, num_leaves, exact)
        outputs, results = vjp(lambda c: _flat(segments.segment(k, c)), carry_in, variables,
                               seeds, want)
        d_vars = [dw for dw, _ in results]
        grads = [tf.add_n([g] + [dw[j] for dw in d_vars]) for j, g in enumerate(grads)]
        carried = [d_carry for _, d_carry in results if d_carry is not None]
        found = _note_if(check, found, k, loss=outputs[:1], carry_grad=sum(carried, []),
                         grads=sum(d_vars, []))
        if record:
            norms = norms.write(k, tf.stack([_norm(c, loss_dtype) for c in carried]))
        return i + 1, carried, grads, loss + tf.cast(outputs[0], loss_dtype), found, norms

    grads = [tf.zeros_like(v) for v in variables]
    _, carried, grads, loss, found, norms = tf.while_loop(
        lambda k, *_: k < segments.count, body,
        (tf.constant(0), carried, grads, tf.zeros([], loss_dtype), found, norms),
        parallel_iterations=PARALLEL_SEGMENTS)
    return loss, grads, carried, found, (norms.stack() if record else None)


def _norm(tensors: list, dtype: tf.DType) -> tf.Tensor:
    """The Euclidean norm of a flat list of tensors taken together."""
    return tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(tf.cast(t, dtype))) for t in tensors]))


def _truncated_one_sweep(segments: Segments, carry: list, variables: list, vjp, loss_dtype,
                         check: bool):
    """m = 1: no cotangent crosses a cut, so forward and backward of a segment run together."""
    seeds = [[1.0] + [None] * len(carry)]

    def body(k, carry, grads, loss, found):
        outputs, [(d_vars, _)] = vjp(lambda c: _flat(segments.segment(k, c)), carry, variables,
                                     seeds, [False])
        grads = [g + d for g, d in zip(grads, d_vars)]
        found = _note_if(check, found, k, carry=outputs[1:], loss=outputs[:1], grads=d_vars)
        return k + 1, outputs[1:], grads, loss + tf.cast(outputs[0], loss_dtype), found

    grads = [tf.zeros_like(v) for v in variables]
    _, final_carry, grads, loss, found = tf.while_loop(
        lambda k, *_: k < segments.count, body,
        (tf.constant(0), list(carry), grads, tf.zeros([], loss_dtype), no_findings()),
        parallel_iterations=PARALLEL_SEGMENTS)
    initial_carry_grad = [tf.zeros_like(c) for c in carry]
    return ChainGradients(loss, grads, final_carry, initial_carry_grad,
                          non_finite=found if check else None)


def _flat(loss_and_carry) -> list:
    loss, carry = loss_and_carry
    return [loss] + list(carry)


class StaticChainGradients(NamedTuple):
    loss: tf.Tensor
    grads: list
    carry_grads: list
    non_finite: Optional[tf.Tensor] = None


def static_value_and_gradients(segments: Sequence[StageFn], carry: list, variables: list,
                               linearize, *, loss_dtype: tf.DType, recompute: bool,
                               check_numerics: bool = False) -> StaticChainGradients:
    """The exact chain over a fixed list of heterogeneous segments (CNN stages), unrolled.

    Each segment may carry a value of its own shape, so the loops are Python loops (a handful of
    stages, traced once). `segments[k](carry) -> (loss_k or None, carry)`; only losses that are
    not None are differentiated; the last segment usually returns an empty carry.

    Args:
      segments: the stage functions, in order.
      carry: flat list of tensors entering the first segment.
      variables: one list of variables per segment (each segment differentiates only its own).
      linearize: the backend's `linearize` (see `vjp.py`).
      loss_dtype: dtype of the loss accumulator.
      recompute: False keeps each segment's pullback (its activations) from the forward pass;
        True keeps only the boundary values and re-runs each segment in the backward pass.
      check_numerics: test every segment's values for NaN/Inf and return `non_finite`.

    Returns:
      `StaticChainGradients(loss, grads, carry_grads, non_finite)`: grads one list per segment,
      carry_grads dLoss/d(carry entering segment k) for every k.
    """
    boundaries, kept, found = [], [], no_findings()
    for k, (segment, segment_variables) in enumerate(zip(segments, variables)):
        boundaries.append(carry)
        if recompute:
            outputs, pullback = _flat(segment(carry)), None
        else:
            outputs, pullback = linearize(lambda c, f=segment: _flat(f(c)), carry,
                                          segment_variables)
        kept.append((outputs, pullback))
        carry = outputs[1:]
        found = _note_if(check_numerics, found, k, carry=carry, loss=outputs[:1])
    result = _static_backward(segments, boundaries, kept, variables, linearize, loss_dtype)
    if not check_numerics:
        return result
    for k in range(len(segments)):
        found = note_non_finite(found, k, carry_grad=result.carry_grads[k], grads=result.grads[k])
    return result._replace(non_finite=found)


def _static_backward(segments, boundaries, kept, variables, linearize, loss_dtype):
    loss, grads, carry_grads = tf.zeros([], loss_dtype), [None] * len(segments), [None] * len(
        segments)
    cotangent = []
    for k in reversed(range(len(segments))):
        outputs, pullback = kept[k]
        if pullback is None:  # recompute: the forward values were not kept
            outputs, pullback = linearize(lambda c, f=segments[k]: _flat(f(c)), boundaries[k],
                                          variables[k])
        seeds = [None if outputs[0] is None else 1.0] + (cotangent or [None] * (len(outputs) - 1))
        [(grads[k], cotangent)] = pullback([seeds], [True])
        carry_grads[k] = cotangent
        if outputs[0] is not None:
            loss += tf.cast(outputs[0], loss_dtype)
    return StaticChainGradients(loss, grads, carry_grads)
