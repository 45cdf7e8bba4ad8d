"""Compatibility with TF1-style graph code: `tbptt.compat.v1`."""

from tbptt.compat import v1

__all__ = ["v1"]
