"""``ccgate server``: the small central server that daemons and admins talk to.

Design:

- The wire contract is ``docs/protocol.md``; this package implements it and nothing else.
- ``db`` holds the current schema as SQLModel tables and opens a database (SQLite file by default,
  any SQLAlchemy URL otherwise). Opening runs the named, ordered migrations of ``migrations``,
  recorded in a ``migrations`` table; ``create_all`` is never used, so an old database is upgraded
  step by step. The SQL is portable (no SQLite-only syntax; BIGINT for micro-dollars) so the same
  code runs on PostgreSQL.
- ``state`` owns the server's files (signing key, secret, default database) and ``server init``.
  Secrets at rest: provider API keys are encrypted with a key derived from the server secret;
  virtual keys and admin tokens are stored as sha256 hex only.
- ``admin`` (customers, teams, keys, providers, price override, audit), ``devices`` (key and
  device authentication), ``bundles`` (signed policy bundles) and
  ``usage`` (ingest, spent, rollups) are the core: plain functions over a database engine that
  raise ``RefusedError`` subclasses carrying their HTTP status. They never see a request.
- ``app`` is the Starlette layer: authentication, JSON in and out, the error envelope; blocking
  database work runs in a worker thread so the event loop stays free. ``openapi`` describes it;
  ``runner`` loads the state and runs uvicorn.

Allowed imports: base, ``ccgate.accounting``, ``ccgate.policy`` (and its own modules): the
server process loads nothing of the laptop side.
"""
