"""Benchmarks for egressd, run by hand or in smoke mode from the test suite; see bench/README.md."""
