"""Runs: the run directory (:mod:`fedmem.runs.rundir`), the central run
(:mod:`fedmem.runs.central`) and the orchestration of a whole experiment
(:mod:`fedmem.runs.experiment`).
"""
