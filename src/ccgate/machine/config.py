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
    # A standalone daemon may send to another provider kind (bedrock, vertex, foundry) with its
    # options (region, project, ...); the CLI checks both (ccgate.policy.provider_kinds).
    provider: str = "anthropic"
    provider_options: dict[str, Any] = field(default_factory=dict)


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
        "provider": str,
        "provider_options": dict,
    }
    values: dict[str, Any] = {}
    for key, value in data.items():
        kind = known.get(key)
        if kind is None:
            continue  # keys from newer versions are ignored, not fatal
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{source}: '{key}' must be {kind.__name__}, got {value!r}.")
        values[key] = value
    return Config(**values)


def save(paths: Paths, config: Config) -> None:
    paths.ensure()
    atomic_write(paths.config_file, tomli_w.dumps(asdict(config)).encode("utf-8"))


def resolve(
    paths: Paths,
    *,
    port: int | None = None,
    upstream_url: str | None = None,
    log_content: bool | None = None,
    passthrough: bool | None = None,
    provider: str | None = None,
    provider_options: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """The effective configuration: flags over environment over file over defaults."""
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
    if not config.upstream_url.startswith(("http://", "https://")):
        raise ConfigError(
            f"Upstream URL {config.upstream_url!r} must start with http:// or https://."
        )
