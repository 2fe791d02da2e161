"""Who may reach the station: this machine only by default; other machines only with a token, never an open page."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from omegaconf import DictConfig

from leukonet.errors import DataError

MIN_TOKEN = 16  # characters


def is_loopback(host: str) -> bool:
    """``host`` (a name or address, with or without a port) is this machine."""
    name = urlsplit(f"//{host}").hostname or host
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host(cfg: DictConfig) -> None:
    """Refuse, before anything is loaded, a configuration that would open the station to other machines
    without a token."""
    token = cfg.get("token")
    if token is not None and len(str(token)) < MIN_TOKEN:
        raise DataError(f"token must be at least {MIN_TOKEN} characters (python -c 'import secrets; "
                        f"print(secrets.token_urlsafe())' makes one)")
    if is_loopback(str(cfg.host)):
        return
    if not cfg.allow_remote:
        raise DataError(f"host={cfg.host} would open the station to other machines; the default host=127.0.0.1 "
                        f"serves this machine only. To serve the network on purpose, add allow_remote=true and a token")
    if token is None:
        raise DataError(f"allow_remote=true needs token=... (at least {MIN_TOKEN} characters, or LEUKONET_TOKEN in the "
                        f"environment): the station is never open to other machines without one")
