"""Whole-cache operations behind the CLI: ``info`` (:func:`summary`), :func:`verify`, :func:`convert` and ``stats``."""

from .convert import convert
from .info import summary
from .stats import describe, plot_stats, position_stats, text_histogram
from .verify import VerifyReport, verify

__all__ = ["VerifyReport", "convert", "describe", "plot_stats", "position_stats", "summary", "text_histogram", "verify"]
