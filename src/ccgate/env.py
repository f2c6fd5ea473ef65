"""Every environment variable ccgate reads, in one place."""

CCGATE_HOME = "CCGATE_HOME"
"""Put all state (config, ledger, pid, logs, keys) in this one folder."""

CCGATE_UPSTREAM_URL = "CCGATE_UPSTREAM_URL"
"""Override the upstream base URL (default https://api.anthropic.com)."""

CCGATE_PORT = "CCGATE_PORT"
"""Default port for the daemon."""

ANTHROPIC_API_KEY = "ANTHROPIC_API_KEY"
"""Upstream key for standalone mode when none is stored in the keyring."""

NO_COLOR = "NO_COLOR"
"""https://no-color.org: plain output when set."""

CLAUDE_CONFIG_DIR = "CLAUDE_CONFIG_DIR"
"""Claude Code's own override of ~/.claude."""

CCGATE_SERVER_URL = "CCGATE_SERVER_URL"
"""The ccgate server for `ccgate login`, the admin CLI and `ccgate run`."""

CCGATE_ADMIN_TOKEN = "CCGATE_ADMIN_TOKEN"
"""The admin token for `ccgate admin ...`."""
