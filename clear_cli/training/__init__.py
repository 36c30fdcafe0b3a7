"""Distillation internals: the recipe and batches from a synth set (memory figures: clear_cli.models.memory).

The entry point is `clear_cli.distill` (clear_cli/jobs/distill.py); these modules hold what it is built from.
The distillation-gain check composes jobs, so it lives with them: clear_cli/jobs/gain.py.
"""
