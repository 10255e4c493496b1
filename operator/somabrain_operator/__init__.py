"""The SomaBrain operator: Tenant resources in, running publishers out.

This package lives in the `operator/` source folder but is named `somabrain_operator`,
so it never shadows Python's standard-library `operator` module.
"""
