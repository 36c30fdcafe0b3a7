"""Distillation internals: the recipe, batches from a synth set, memory figures.

The entry point is `clear_cli.distill` (clear_cli/jobs/distill.py); these modules hold what it is built from.
The distillation-gain check composes jobs, so it lives with them: clear_cli/jobs/gain.py.
"""
