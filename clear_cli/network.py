"""Whether the model hub can be reached, asked once per process, so that an offline machine fails in seconds with
one line instead of waiting through the hub client's retries (and printing them) for every file."""

from __future__ import annotations

import os
import socket

_REACHABLE: dict[str, bool] = {}


def hub_reachable(host: str = "huggingface.co") -> bool:
    """False when the hub client's offline switch is set or the host does not answer on 443 within 5 s. A proxy is
    left to the client (True)."""
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = os.environ.get("HF_ENDPOINT", host).split("://")[-1].split("/")[0].split(":")[0] or host
    if host not in _REACHABLE:
        try:
            socket.create_connection((host, 443), timeout=5).close()
            _REACHABLE[host] = True
        except OSError:
            _REACHABLE[host] = False
    return _REACHABLE[host]
