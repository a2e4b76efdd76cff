"""Sequence parallelism (Ulysses) over packed varlen rows.

* ``groups``: the data-parallel x sequence-parallel layout of the ranks (torch ``DeviceMesh``).
* ``shard``: one packed row cut into ``sequence_parallel_size`` contiguous shards.
* ``ulysses``: the all-to-alls around ``varlen_attn_func`` (seq-sharded <-> head-sharded).
* ``limits``: the models that cannot be split this way, refused in one line.

This package imports nothing at import time, so ``packtune.packing.collate`` can import the
context class without an import cycle.
"""
