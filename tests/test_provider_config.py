"""Standalone provider settings: `--provider`, `--provider-option`, `--model-map` resolved,
checked and remembered in config.toml (the daemon that `ccgate up` starts reads them back)."""

from __future__ import annotations

import pytest

from ccgate import paths
from ccgate.cli.local import _resolve
from ccgate.errors import ConfigError
from ccgate.gateway.daemon import provider_args
from ccgate.machine import config


def resolve(**flags: object) -> config.Config:
    base: dict[str, object] = {"provider": None, "provider_option": None, "model_map": None}
    return _resolve(paths.resolve(), **{**base, **flags})  # type: ignore[arg-type]


def test_a_cloud_provider_gets_its_endpoint_and_round_trips_through_the_file() -> None:
    wanted = resolve(
        provider="bedrock",
        provider_option=["region=eu-west-1", "profile_prefix=eu"],
        model_map=["claude-opus-5-5=arn:aws:bedrock:eu-west-1:1:inference-profile/x"],
    )
    assert wanted.upstream_url == "https://bedrock-runtime.eu-west-1.amazonaws.com"
    assert wanted.provider_options == {
        "region": "eu-west-1",
        "profile_prefix": "eu",
        "models": {"claude-opus-5-5": "arn:aws:bedrock:eu-west-1:1:inference-profile/x"},
    }
    config.save(paths.resolve(), wanted)
    assert config.load(paths.resolve()) == wanted
    assert resolve() == wanted  # a plain `ccgate up` starts the same daemon
    # ... and the daemon `up` starts gets the same options on its command line.
    assert provider_args(wanted) == [
        "--provider",
        "bedrock",
        "--provider-option",
        "region=eu-west-1",
        "--provider-option",
        "profile_prefix=eu",
        "--model-map",
        "claude-opus-5-5=arn:aws:bedrock:eu-west-1:1:inference-profile/x",
    ]


def test_switching_kind_drops_the_old_kinds_options_and_anthropic_goes_back_home() -> None:
    config.save(
        paths.resolve(),
        resolve(provider="vertex", provider_option=["project=acme-1234", "location=global"]),
    )
    anthropic = resolve(provider="anthropic")
    assert (anthropic.provider, anthropic.provider_options) == ("anthropic", {})
    assert anthropic.upstream_url == config.DEFAULT_UPSTREAM
    assert provider_args(anthropic) == []


def test_an_explicit_upstream_wins_over_the_kinds_endpoint() -> None:
    chosen = resolve(provider="foundry", upstream_url="https://proxy.example/anthropic")
    assert chosen.upstream_url == "https://proxy.example/anthropic"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"provider": "bedrock"}, "needs the option 'region'"),
        ({"provider": "vertex", "provider_option": ["project"]}, "takes NAME=VALUE"),
        (
            {
                "provider": "bedrock",
                "provider_option": ["region=us-east-1"],
                "model_map": ["claude-x"],
            },
            "takes NAME=VALUE",
        ),
        ({"provider": "nimbus"}, "kind must be one of"),
    ],
)
def test_bad_provider_flags_are_a_config_error(flags: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve(**flags)


def test_a_hand_edited_file_with_options_of_the_wrong_type_is_refused() -> None:
    file = paths.resolve().config_file
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text('provider = "bedrock"\nprovider_options = "region=us-east-1"\n')
    with pytest.raises(ConfigError, match="'provider_options' must be dict"):
        config.load(paths.resolve())
