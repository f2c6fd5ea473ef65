"""The upstream timeouts in config.toml: read, checked, and only written when changed."""

from __future__ import annotations

import pytest

from ccgate import paths as paths_mod
from ccgate.errors import ConfigError
from ccgate.gateway.routing import Timeouts
from ccgate.machine import config


def test_timeouts_come_from_the_file_and_defaults_are_not_written_back() -> None:
    paths = paths_mod.resolve()
    config.save(paths, config.Config())
    assert "timeout" not in paths.config_file.read_text()
    paths.config_file.write_text("idle_timeout_s = 900\nconnect_timeout_s = 2.5\n")
    loaded = config.load(paths)
    timeouts = Timeouts().merged(loaded.timeouts())
    assert (timeouts.idle_s, timeouts.connect_s, timeouts.first_byte_s) == (900.0, 2.5, 600.0)
    config.save(paths, loaded)
    assert config.load(paths) == loaded


@pytest.mark.parametrize("value", ["0", "-3", "'soon'", "true"])
def test_a_timeout_that_is_not_a_positive_number_is_a_clear_error(value: str) -> None:
    paths = paths_mod.resolve()
    paths.ensure()
    paths.config_file.write_text(f"first_byte_timeout_s = {value}\n")
    with pytest.raises(ConfigError, match="'first_byte_timeout_s' must be a number of seconds"):
        config.load(paths)
