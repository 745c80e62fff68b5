"""Plots and the HTML report."""

from gradleak.report.html import build_run_report

__all__ = ["build_run_report"]
