"""`clear comfy install PATH_TO_COMFYUI`: thin over `clear_cli.comfy.install.install`."""

from __future__ import annotations

from pathlib import Path

import typer

comfy_app = typer.Typer(help="ComfyUI: install the CLEAR Attention node (docs/comfyui.md).", no_args_is_help=True,
                        rich_markup_mode=None)


@comfy_app.command("install")
def install_cmd(
    comfyui: Path = typer.Argument(..., help="Your ComfyUI folder (the one holding custom_nodes/)."),
    link: bool = typer.Option(False, "--link", help="Symlink this clear_cli instead of copying it (for a "
                                                    "development checkout: edits show after a ComfyUI restart)."),
    name: str = typer.Option("comfyui-clear", "--name", help="Folder name under custom_nodes/."),
) -> None:
    """Put the CLEAR Attention node pack (with clear_cli in its lib/) into ComfyUI's custom_nodes."""
    from clear_cli.comfy.install import install

    for line in install(comfyui, link=link, name=name).summary_lines():
        print(line)


def register(app: typer.Typer) -> None:
    app.add_typer(comfy_app, name="comfy")
