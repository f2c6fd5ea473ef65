"""ccgate: a localhost gateway that governs Claude Code.

Packages by role; an arrow is an allowed import, enforced by tests/test_layout.py
(docs/how-it-works.md draws the map):

- base, the modules directly here: ``errors``, ``env`` (every environment variable name),
  ``paths`` (every file location), ``_files`` and ``wire`` (the error envelope and constants
  the gateway and the server share). They import no subpackage.
- ``accounting`` (metering, pricing, periods) -> base.
- ``policy`` (limits, wallet, grants, bundle) -> base, accounting.
- ``store`` (the local ledger, reports) -> base.
- ``machine`` (config, secret store, Claude Code settings, service units) -> base.
- ``client`` (server clients, profiles) -> base, accounting, policy, machine.
- ``gateway`` (the relay, governor, daemon, ``ccgate run``, up/down, login) -> all of the above.
- ``server`` (the central server) -> base, accounting, policy only: it never loads the laptop
  side (no keyring, no relay).
- ``cli`` parses arguments, calls the core and renders; nothing imports it.
"""

__version__ = "0.1.0"
