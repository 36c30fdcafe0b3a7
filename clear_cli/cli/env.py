"""`clear env`: versions and devices, for bug reports."""

from __future__ import annotations

import json

import typer


def env_report() -> dict:
    """Versions of the stack, the devices present, and whether FlexAttention is usable."""
    import platform

    import torch

    info: dict = {"clear-dit": None, "python": platform.python_version(), "platform": platform.platform()}
    from clear_cli import __version__

    info["clear-dit"] = __version__
    for name in ("torch", "diffusers", "transformers", "accelerate", "safetensors", "typer", "peft"):
        try:
            mod = __import__(name)
            info[name] = getattr(mod, "__version__", "?")
        except Exception as e:  # a broken install is exactly what this command should show
            info[name] = f"not importable ({type(e).__name__})"
    info["cuda_available"] = torch.cuda.is_available()
    info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info["cpu_threads"] = torch.get_num_threads()
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

        info["flex_attention"] = "available" + ("" if torch.cuda.is_available() else " (CPU: forward only)")
    except Exception as e:
        info["flex_attention"] = f"unavailable ({type(e).__name__})"
    return info


def register(app: typer.Typer) -> None:
    @app.command("env")
    def env(json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
        """Show versions (python, torch, diffusers, transformers, accelerate), devices and FlexAttention support."""
        info = env_report()
        if json_out:
            print(json.dumps(info, indent=2))
            return
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
