"""Store: the laptop's request log. ``ledger`` is the local SQLite ledger (and the sync queue to
the server); ``reports`` reads it back for ``ccgate usage``.

Allowed imports: base.
"""
