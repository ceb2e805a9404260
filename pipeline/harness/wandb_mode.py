"""An online W&B run with no route to its server logs offline instead of stalling the stage.

`wandb.init` in online mode without a network retries for `init_timeout` (90 s) and then raises, so the
stage fails after ~100 s having done nothing. `fall_back_offline_without_server` opens one TCP
connection to the server (`WANDB_BASE_URL`, or the `HTTPS_PROXY` when one is set) within a few
seconds, DNS included; if none opens it switches `WANDB_MODE` to offline with a warning: the run's
files land in wandb/ as in the default mode, and `wandb sync` uploads them later.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
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


def fall_back_offline_without_server(timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """With WANDB_MODE=online and no answer from the W&B server (or proxy), set WANDB_MODE=offline."""
    if os.environ.get("WANDB_MODE") != "online":
        return
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        target = proxy
    else:
        from wandb import Settings

        target = Settings().base_url  # wandb's default server unless WANDB_BASE_URL or a settings file says otherwise
    if server_answers(target, timeout_s):
        return
    os.environ["WANDB_MODE"] = "offline"
    where = urlparse(target if "//" in target else f"//{target}").hostname or "the W&B server"
    log.warning("WANDB_MODE=online but %s did not answer within %g s (no network?): logging offline to wandb/ "
                "instead; upload later with `wandb sync wandb/offline-run-*`", where, timeout_s)
