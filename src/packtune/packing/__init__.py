"""Packing: which samples share a row (``pack_plan``) and how a row is laid out (``packs``)."""

from packtune.packing.plan import STRATEGIES, pack_plan, plan_array, plan_order

__all__ = ["STRATEGIES", "pack_plan", "plan_array", "plan_order"]
