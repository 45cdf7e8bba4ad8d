"""NaN/Inf findings of a chain (`check_numerics=True`): per kind, the first segment where a
non-finite value appeared.

Every segment's carry, loss, carry cotangent and variable gradients are tested as they are
made (one `reduce_all(is_finite)` per tensor); a chain returns its findings ``[4]`` int32 (-1
where none), and the caller reports them (`checks.report_non_finite`).
"""

import tensorflow as tf

from tbptt._src.core import checks

# What check_numerics watches, in the order of `non_finite`. A carry and a loss are made in the
# forward order, so the first one is the lowest segment index; cotangents and variable gradients
# are made in the backward order, so the first one is the highest.
NUMERICS_KINDS = checks.NUMERICS_KINDS
_FIRST_IS_LOWEST = (True, True, False, False)


def no_findings() -> tf.Tensor:
    return tf.fill([len(NUMERICS_KINDS)], -1)


def _all_finite(tensors: list) -> tf.Tensor:
    values = [t.values if isinstance(t, tf.IndexedSlices) else t for t in tensors]
    flags = [
        tf.reduce_all(tf.math.is_finite(t)) for t in values if t is not None and t.dtype.is_floating
    ]
    return tf.reduce_all(tf.stack(flags)) if flags else tf.constant(True)


def note_non_finite(found: tf.Tensor, k, **values) -> tf.Tensor:
    """`found` updated with segment `k`'s values, given by kind (`state=[...]`, `loss=[...]`:
    the carried value, a stage's activation in a static chain, is a "state")."""
    new = tf.stack(
        [
            tf.where(_all_finite(values[kind]), -1, tf.cast(k, tf.int32))
            if kind in values
            else tf.constant(-1)
            for kind in NUMERICS_KINDS
        ]
    )
    return merge_non_finite(found, new)


def merge_non_finite(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """Two findings joined (in any order): per kind the first segment, -1 for none."""
    lowest = tf.where((a < 0) | ((b >= 0) & (b < a)), b, a)
    return tf.where(tf.constant(_FIRST_IS_LOWEST), lowest, tf.maximum(a, b))


def offset_non_finite(found: tf.Tensor, first) -> tf.Tensor:
    """Findings of a sub-chain that starts at segment `first`, in the outer chain's indices."""
    return tf.where(found >= 0, found + tf.cast(first, tf.int32), found)


def note_if(check: bool, found: tf.Tensor, k, **values) -> tf.Tensor:
    return note_non_finite(found, k, **values) if check else found
