"""Distillation internals: the recipe, batches from a synth set, memory figures, the distillation-gain check.

The entry point is `clear_cli.distill` (clear_cli/distill.py); these modules hold what it is built from.
"""
