"""Whole-cache operations behind the CLI: ``info`` (:func:`summary`), :func:`verify`, :func:`convert` and ``stats``."""

from .convert import convert
from .info import completeness, describe_extras, extras_summary, summary
from .stats import describe, panels, plot_stats, position_stats, text_histogram
from .verify import VerifyReport, verify

__all__ = [
    "VerifyReport",
    "completeness",
    "convert",
    "describe",
    "describe_extras",
    "extras_summary",
    "panels",
    "plot_stats",
    "position_stats",
    "summary",
    "text_histogram",
    "verify",
]
