"""Reporting of finished runs: tables (:mod:`fedmem.reporting.tables`), plots
(:mod:`fedmem.reporting.plots`) and ``report.md`` (:mod:`fedmem.reporting.report`).
"""
