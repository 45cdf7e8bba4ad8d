"""How much gradient truncation loses on your model: `truncation_report`."""

from tbptt._src.diagnostics import TruncationReport
from tbptt._src.diagnostics import TruncationRow
from tbptt._src.diagnostics import truncation_report

__all__ = ["TruncationReport", "TruncationRow", "truncation_report"]
