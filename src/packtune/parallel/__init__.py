"""Sequence parallelism (Ulysses) over packed varlen rows.

* ``groups``: the data-parallel x sequence-parallel layout of the ranks (torch ``DeviceMesh``).
* ``sequence_shards``: one packed row cut into ``sequence_parallel_size`` contiguous shards.
* ``ulysses``: the all-to-alls around ``varlen_attn_func`` (seq-sharded <-> head-sharded).
* ``limits``: the models that cannot be split this way, refused in one line.

Below ``packtune.packing`` (whose ``Batch`` carries the shard's context) and above
``packtune.attention`` (whose kernels it wraps); this package imports nothing at import time.
"""
