"""Benchmarks on the local stack; each compares against a reference measured in the same run."""
