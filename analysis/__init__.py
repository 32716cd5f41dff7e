"""Reads run folders under outputs/ and turns them into tables and plots.

Nothing here yet: the cost-versus-quality tables (`python -m analysis.tables`)
and plots arrive with the sweeps-and-analysis issue. Until then each run
folder's result.json is the record (see outputs/README.md).
"""
