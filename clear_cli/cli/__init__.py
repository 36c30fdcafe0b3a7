"""Typer commands: thin (parse -> config -> core -> render), one command per module."""
