"""How much gradient truncation loses on your model: `truncation_report`."""

from tbptt._src.diagnostics import TruncationReport, TruncationRow, truncation_report

__all__ = ["TruncationReport", "TruncationRow", "truncation_report"]
