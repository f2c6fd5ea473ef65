"""``python -m ccgate``: how ``ccgate up`` starts the detached daemon with the same interpreter."""

from ccgate.cli import main

main()
