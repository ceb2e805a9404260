"""The offline fallback of an online W&B run (pipeline/harness/wandb_mode.py) asks the server the run would log to:
a self-hosted one (WANDB_BASE_URL, or `base_url` in wandb's settings files), played here by a real local HTTP
server, keeps the run online; a closed port sends it offline with a warning naming that server."""
from __future__ import annotations

import http.server
import logging
import os
import threading
from collections.abc import Iterator

import pytest

from pipeline.harness.wandb_mode import fall_back_offline_without_server, server_url

from conftest import free_port


@pytest.fixture
def self_hosted() -> Iterator[str]:
    """A local HTTP server standing in for a self-hosted W&B; its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def online(monkeypatch, tmp_path):
    """WANDB_MODE=online, no proxy, no settings file of the user's (HOME and the working directory are empty)."""
    for var in ("WANDB_BASE_URL", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
                "WANDB_CONFIG_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "online")


def test_a_self_hosted_server_that_answers_keeps_the_run_online(online, self_hosted, monkeypatch):
    monkeypatch.setenv("WANDB_BASE_URL", self_hosted)
    assert server_url() == self_hosted
    fall_back_offline_without_server(timeout_s=2.0)
    assert os.environ["WANDB_MODE"] == "online"


def test_a_closed_port_logs_offline_naming_the_configured_server(online, monkeypatch):
    closed = free_port()  # bound once and released: nothing listens there
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed}")
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logger = logging.getLogger("pipeline.harness.wandb_mode")
    logger.addHandler(handler)
    try:
        fall_back_offline_without_server(timeout_s=2.0)
    finally:
        logger.removeHandler(handler)
    assert os.environ["WANDB_MODE"] == "offline"
    assert len(warnings) == 1 and f"127.0.0.1:{closed}" in warnings[0] and "wandb sync" in warnings[0], warnings


def test_base_url_from_wandbs_settings_file(online, self_hosted, tmp_path):
    """`wandb login --host URL` writes base_url to a settings file; without WANDB_BASE_URL the probe reads it."""
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / "settings").write_text(f"[default]\nbase_url = {self_hosted}\n")
    assert server_url() == self_hosted
    fall_back_offline_without_server(timeout_s=2.0)
    assert os.environ["WANDB_MODE"] == "online"
