"""Benchmarks: each prints what it measured and ends with one JSON line (`python -m bench.<name>`).

They compare against a baseline measured in the same run and are not part of the test suite.
"""
