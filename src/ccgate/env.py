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

CCGATE_KEY_PREFIX = "CCGATE_KEY_"
"""`ccgate run --key NAME` reads the key from CCGATE_KEY_<NAME> (upper-cased): CI secrets."""

CCGATE_SERVER_FINGERPRINT = "CCGATE_SERVER_FINGERPRINT"
"""Pins the server key for `ccgate run` on a runner that never ran `ccgate login`."""

CCGATE_SERVER_SECRET = "CCGATE_SERVER_SECRET"
"""The server's secret for encrypting provider keys (base64), instead of its 0600 file."""

ANTHROPIC_BASE_URL = "ANTHROPIC_BASE_URL"
ANTHROPIC_AUTH_TOKEN = "ANTHROPIC_AUTH_TOKEN"
"""What Claude Code reads to find its gateway and the token to send it."""

ANTHROPIC_CUSTOM_HEADERS = "ANTHROPIC_CUSTOM_HEADERS"
"""Headers Claude Code adds to every request: passthrough mode sends the ccgate key in one."""

XDG_CONFIG_HOME = "XDG_CONFIG_HOME"
XDG_DATA_HOME = "XDG_DATA_HOME"
XDG_STATE_HOME = "XDG_STATE_HOME"
PYTHON_KEYRING_BACKEND = "PYTHON_KEYRING_BACKEND"
"""Not ccgate's, but they decide which files and keyring it uses (copied into service units)."""

CCGATE_OTLP_HEADERS = "CCGATE_OTLP_HEADERS"
"""`ccgate server run --otlp-endpoint`: the collector headers (`name=value,...`) the bundle seals
to every device; in the environment so a collector credential stays off the command line."""
