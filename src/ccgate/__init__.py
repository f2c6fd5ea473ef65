"""ccgate: a localhost gateway that governs Claude Code.

The package is layered so that decisions stay pure and I/O stays at the edges:

- ``env`` and ``paths`` own every environment variable name and every file location.
- ``errors`` holds the ``CcgateError`` hierarchy (messages written for users) and exit codes.
- ``pricing`` and ``metering`` turn an upstream response into tokens and micro-dollars.
- ``ledger`` is the local SQLite log; ``reports`` reads it back.
- ``proxy`` is the Starlette app in the path of every request; ``daemon`` runs and manages it.
- ``cli`` parses arguments, calls the core and renders; it never touches SQL or HTTP itself.
"""

__version__ = "0.1.0"
