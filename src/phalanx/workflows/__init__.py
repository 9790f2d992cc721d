"""Compositions the CLI, the demo and sweeps run: build an ensemble from a config, train into a run folder,
evaluate and report (``experiment``), verify pairs / an ensemble and select members (``verify``).

This layer sits above every library package and below the CLI and the demo; no library package imports it.
"""
