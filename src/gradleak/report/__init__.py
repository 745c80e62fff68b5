"""Plots, image grids and the HTML report (``gradleak.report.html.build_run_report``)."""
