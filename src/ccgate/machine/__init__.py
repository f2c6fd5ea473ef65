"""Machine: this laptop's own files and OS integration, with no knowledge of the gateway.

``config`` is ``config.toml``, ``credentials`` the secret store (keyring or a 0600 file),
``claude_settings`` patches and restores Claude Code's settings.json, ``service`` writes the
systemd or launchd unit. The server never loads this package (no keyring there).

Allowed imports: base.
"""
