"""Sweeps: grids of ordinary runs on Ray, and the reproduction report.

``retain sweep`` expands a sweep file (or flags) into run configs (``grid``), runs each as a Ray
task in its own folder (``engine``, ``tasks``), and writes a report of mean ± std over seeds
beside the published numbers (``report``, ``published``). ``retain reproduce`` runs a shipped
sweep file (``retain/sweeps/``). Nothing here is imported by ``retain`` itself, and Ray only
when a sweep starts.
"""
