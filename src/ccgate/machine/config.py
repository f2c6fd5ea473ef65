"""The local configuration file (``config.toml`` in the config dir).

``ccgate up`` remembers the options it was given here, so a later plain ``ccgate up`` starts the
same daemon. Precedence everywhere: command-line flag, then environment variable, then this file,
then the default.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import tomli_w

from ccgate import env
from ccgate._files import atomic_write
from ccgate.errors import ConfigError
from ccgate.paths import Paths

DEFAULT_PORT = 7411
DEFAULT_UPSTREAM = "https://api.anthropic.com"


@dataclass(frozen=True)
class Config:
    port: int = DEFAULT_PORT
    upstream_url: str = DEFAULT_UPSTREAM
    log_content: bool = False
    passthrough: bool = False
    session_budget_micros: int | None = None
    """Standalone session cap: money one Claude Code session may spend (None: no cap)."""
    session_rpm: int | None = None
    """Standalone session cap: requests one Claude Code session may make per minute."""
    # A standalone daemon may send to another provider kind (bedrock, vertex, foundry) with its
    # options (region, project, ...); the CLI checks both (ccgate.policy.provider_kinds).
    provider: str = "anthropic"
    provider_options: dict[str, Any] = field(default_factory=dict)
    # Upstream timeouts in seconds (see docs/admin.md, "Timeouts"); in server mode these are the
    # defaults a provider entry's own timeouts override.
    connect_timeout_s: float = 10.0
    stream_first_byte_timeout_s: float = 60.0
    first_byte_timeout_s: float = 600.0
    idle_timeout_s: float = 300.0

    def timeouts(self) -> dict[str, float]:
        """The timeouts by the names gateway.routing.Timeouts uses."""
        return {
            "connect_s": self.connect_timeout_s,
            "stream_first_byte_s": self.stream_first_byte_timeout_s,
            "first_byte_s": self.first_byte_timeout_s,
            "idle_s": self.idle_timeout_s,
        }


_TIMEOUT_KEYS = (
    "connect_timeout_s",
    "stream_first_byte_timeout_s",
    "first_byte_timeout_s",
    "idle_timeout_s",
)


def load(paths: Paths) -> Config:
    path = paths.config_file
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Config()
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML ({exc}); fix or delete it.") from None
    return _from_mapping(data, source=str(path))


def _from_mapping(data: Mapping[str, Any], *, source: str) -> Config:
    known: dict[str, type] = {
        "port": int,
        "upstream_url": str,
        "log_content": bool,
        "passthrough": bool,
        "session_budget_micros": int,
        "session_rpm": int,
        "provider": str,
        "provider_options": dict,
    }
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in _TIMEOUT_KEYS:
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"{source}: '{key}' must be a number of seconds above 0.")
            values[key] = float(value)
            continue
        kind = known.get(key)
        if kind is None:
            continue  # keys from newer versions are ignored, not fatal
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{source}: '{key}' must be {kind.__name__}, got {value!r}.")
        values[key] = value
    return Config(**values)


def save(paths: Paths, config: Config) -> None:
    paths.ensure()
    # TOML has no null: a cap that is not set is left out.
    data = {k: v for k, v in asdict(config).items() if v is not None}
    defaults = asdict(Config())
    # A timeout left at its default is not written, so a later ccgate's default applies.
    for key in _TIMEOUT_KEYS:
        if data[key] == defaults[key]:
            del data[key]
    atomic_write(paths.config_file, tomli_w.dumps(data).encode("utf-8"))


def resolve(
    paths: Paths,
    *,
    port: int | None = None,
    upstream_url: str | None = None,
    log_content: bool | None = None,
    passthrough: bool | None = None,
    session_budget_micros: int | None = None,
    session_rpm: int | None = None,
    provider: str | None = None,
    provider_options: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """The effective configuration: flags over environment over file over defaults.

    A session cap given as 0 is turned off (the file then leaves it out)."""
    environ = os.environ if environ is None else environ
    config = load(paths)
    env_port = environ.get(env.CCGATE_PORT)
    if env_port:
        try:
            config = replace(config, port=int(env_port))
        except ValueError:
            raise ConfigError(f"{env.CCGATE_PORT}={env_port!r} is not a port number.") from None
    env_upstream = environ.get(env.CCGATE_UPSTREAM_URL)
    if env_upstream:
        config = replace(config, upstream_url=env_upstream)
    if port is not None:
        config = replace(config, port=port)
    if upstream_url is not None:
        config = replace(config, upstream_url=upstream_url)
    if log_content is not None:
        config = replace(config, log_content=log_content)
    if passthrough is not None:
        config = replace(config, passthrough=passthrough)
    if session_budget_micros is not None:
        config = replace(config, session_budget_micros=session_budget_micros or None)
    if session_rpm is not None:
        config = replace(config, session_rpm=session_rpm or None)
    if provider is not None and provider != config.provider:
        # Another kind's options mean nothing to this one.
        config = replace(config, provider=provider, provider_options={})
    if provider_options:
        config = replace(config, provider_options=dict(provider_options))
    validate(config)
    return config


def validate(config: Config) -> None:
    if not 0 < config.port < 65536:
        raise ConfigError(f"Port {config.port} is out of range; choose 1-65535.")
    for name in ("session_budget_micros", "session_rpm"):
        value = getattr(config, name)
        if value is not None and value < 0:
            raise ConfigError(f"'{name}' must not be negative; got {value}.")
    if not config.upstream_url.startswith(("http://", "https://")):
        raise ConfigError(
            f"Upstream URL {config.upstream_url!r} must start with http:// or https://."
        )


def usd_text(micros: int) -> str:
    """Micro-dollars as the exact dollar figure an option takes back: 2_500_000 -> "2.5"."""
    from decimal import Decimal

    return format((Decimal(micros) / 1_000_000).normalize(), "f")


def parse_session_budget(text: str) -> int:
    """``--session-budget``: dollars (``5``, ``2.50``, ``$5``), or ``off``/``0`` for no cap."""
    from decimal import Decimal, InvalidOperation

    cleaned = text.strip().lower().removeprefix("$")
    if cleaned in ("off", "none", "0"):
        return 0
    try:
        dollars = Decimal(cleaned)
    except InvalidOperation:
        dollars = Decimal("NaN")
    micros = dollars * 1_000_000 if dollars.is_finite() else dollars
    if not micros.is_finite() or micros < 1 or dollars > 1_000_000 or micros % 1:
        raise ConfigError(
            f"--session-budget {text!r} is not an amount in dollars (for example 5 or 2.50, at "
            "most 6 decimals; off removes the cap)."
        )
    return int(micros)
