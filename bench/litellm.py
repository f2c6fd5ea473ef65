"""LiteLLM's proxy as a comparison target, installed in a venv of its own and run offline.

``litellm[proxy]`` pulls in a few hundred packages ccgate must not depend on, so the bench keeps
it in ``bench/.venv-litellm`` (git-ignored), created on first use with ``pip install``. It runs
with:

- ``LITELLM_LOCAL_MODEL_COST_MAP=True``: the bundled price map, no download at start;
- a config whose one model (the bench's ``claude-sonnet-4-6``) is ``anthropic/...`` at the fake
  upstream, for its ``/v1/messages`` route; ``ANTHROPIC_API_BASE``/``ANTHROPIC_API_KEY`` point
  its ``/anthropic`` pass-through route at the same fake;
- a random master key (it refuses well-known ones), which clients send as ``x-api-key``.

No database, so no spend tracking; that is LiteLLM at its lightest.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

from bench.processes import REPO, UPSTREAM_KEY, BenchError, Service, free_port, spawn, stop
from bench.processes import wait_http as _wait_http
from tests.support.fake_upstream import DEFAULT_MODEL

VENV = REPO / "bench" / ".venv-litellm"
PACKAGE = "litellm[proxy]"


def executable() -> Path:
    return VENV / "bin" / "litellm"


def installed() -> bool:
    return executable().exists()


def install() -> None:
    """Create the venv and ``pip install 'litellm[proxy]'`` into it (minutes, the first time)."""
    if installed():
        return
    commands = [
        [sys.executable, "-m", "venv", str(VENV)],
        [str(VENV / "bin" / "pip"), "install", "--quiet", PACKAGE],
    ]
    for command in commands:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")


def version() -> str | None:
    done = subprocess.run(
        [
            str(VENV / "bin" / "python"),
            "-c",
            "import importlib.metadata as m;print(m.version('litellm'))",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or None


def _config(upstream_url: str, master_key: str) -> str:
    # JSON is YAML: no YAML writer needed for a file this small.
    config = {
        "model_list": [
            {
                "model_name": DEFAULT_MODEL,
                "litellm_params": {
                    "model": f"anthropic/{DEFAULT_MODEL}",
                    "api_base": upstream_url,
                    "api_key": UPSTREAM_KEY,
                },
            }
        ],
        "general_settings": {"master_key": master_key},
        "litellm_settings": {"drop_params": False, "telemetry": False},
    }
    return json.dumps(config, indent=2)


@contextlib.contextmanager
def proxy(
    *, upstream_url: str, env: Mapping[str, str], work: Path, timeout: float = 120.0
) -> Iterator[tuple[Service, str]]:
    """A running LiteLLM proxy and its master key."""
    if not installed():
        raise BenchError(f"LiteLLM is not installed in {VENV}.")
    master_key = "sk-" + secrets.token_hex(24)
    config = work / "litellm.yaml"
    config.write_text(_config(upstream_url, master_key), encoding="utf-8")
    port = free_port()
    child = dict(env)
    child.update(
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        ANTHROPIC_API_BASE=upstream_url,
        ANTHROPIC_API_KEY=UPSTREAM_KEY,
        LITELLM_LOG="ERROR",
        LITELLM_TELEMETRY="False",
        NO_DOCS="True",
    )
    log = work / "litellm.log"
    command = [str(executable()), "--config", str(config), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--num_workers", "1"]
    process = spawn(command=command, env=child, log=log)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(url + "/health/liveliness", process, log, name="LiteLLM proxy", timeout=timeout)
        yield Service(name="LiteLLM proxy", url=url, process=process, log=log), master_key
    finally:
        stop(process)
