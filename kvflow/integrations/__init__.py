"""Adapters that let other frameworks drive kvflow's engine in-process.

Each adapter lives in its own subpackage and imports its framework only when
imported itself, so ``import kvflow`` never needs an optional extra.
"""
