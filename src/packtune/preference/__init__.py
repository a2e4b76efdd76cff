"""Preference training on packed rows: DPO (sigmoid, IPO, hinge), SimPO, ORPO and reward models.

A pair (prompt, chosen, rejected) becomes two sequences, ``prompt + chosen`` and
``prompt + rejected``, that sit one after the other in the same pack with positions restarting
(``packtune.preference.data``). The objective (``packtune.preference.objective``) reads every
sequence's summed completion log-probs from the packed row, ``loss_chunk_size`` tokens at a
time, and normalises the step by the global number of pairs (``packtune.preference.step``).

This package's ``__init__`` imports nothing heavy: the config check imports ``settings``.
"""
