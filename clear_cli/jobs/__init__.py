"""The jobs behind the commands (synth, distill, evaluate, export, generate, demo): plain functions, no CLI code.

`clear_cli.<job>(...)` is the Python API (exported lazily by the package); the modules live here so that a module
never shadows its function. This package stays empty: importing a job module must not bind a name here.
"""
