"""Device tokens the in-process server tests enrolled, by device id.

``tests/server/conftest.py`` is loaded twice (as pytest's ``conftest`` and as the module the tests
import), so the map lives here, in a module both copies share.
"""

from __future__ import annotations

TOKENS: dict[str, str] = {}
