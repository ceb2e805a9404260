"""An online W&B run with no route to its server logs offline instead of stalling the stage.

`wandb.init` in online mode without a network retries for `init_timeout` (90 s) and then raises, so the
stage fails after ~100 s having done nothing. `fall_back_offline_without_server` opens one TCP
connection to the server the run would log to within a few seconds, DNS included; if none opens it
switches `WANDB_MODE` to offline with a warning: the run's files land in wandb/ as in the default mode,
and `wandb sync` uploads them later.

The server is the one wandb itself would use (`server_url`): `WANDB_BASE_URL`, else `base_url` in wandb's
settings files (`wandb login --host URL` writes it), else wandb's public host; so a self-hosted server is
judged by itself, not by the public one. When a proxy is set for the URL's scheme (`HTTPS_PROXY`,
`HTTP_PROXY`) and `NO_PROXY` does not exempt the host, the proxy is what the connection goes to, so it is
what is probed.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import urllib.request
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 5.0

log = logging.getLogger(__name__)


def server_answers(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to `url`'s host and port opens within `timeout_s`."""
    parsed = urlparse(url if "//" in url else f"//{url}")
    if not parsed.hostname:
        return False
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    answered: list[bool] = []

    def probe() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()
            answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(answered)


def server_url() -> str:
    """The W&B server a run logs to: WANDB_BASE_URL, else base_url of wandb's settings files, else the public host
    (wandb applies them in this order too)."""
    url = os.environ.get("WANDB_BASE_URL", "").strip()
    if url:
        return url
    from wandb import Settings

    settings = Settings(quiet=True)
    try:
        settings.update_from_system_settings()  # the workspace's wandb/settings and the global one
    except Exception as err:  # an unreadable file: wandb.init reports it itself; probe the default server
        log.debug("wandb settings files not read: %s", err)
    return settings.base_url


def probe_target(url: str) -> str:
    """Where a connection to `url` goes first: the proxy for its scheme, unless NO_PROXY exempts its host."""
    parsed = urlparse(url if "//" in url else f"//{url}")
    proxy = urllib.request.getproxies().get(parsed.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(parsed.hostname or ""):
        return proxy
    return url


def fall_back_offline_without_server(timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """With WANDB_MODE=online and no answer from the W&B server (or proxy), set WANDB_MODE=offline."""
    if os.environ.get("WANDB_MODE") != "online":
        return
    url = server_url()
    target = probe_target(url)
    if server_answers(target, timeout_s):
        return
    os.environ["WANDB_MODE"] = "offline"
    parsed = urlparse(target if "//" in target else f"//{target}")
    where = parsed.netloc or "the W&B server"
    via = f" (the proxy for {url})" if target != url else ""
    log.warning("WANDB_MODE=online but %s%s did not answer within %g s (no network?): logging offline to wandb/ "
                "instead; upload later with `wandb sync wandb/offline-run-*`", where, via, timeout_s)
