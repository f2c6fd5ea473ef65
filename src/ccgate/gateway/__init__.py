"""Gateway: the local gateway in the path of every Claude Code request, and what drives it.

``proxy`` is the Starlette app that relays to the upstream and records each request,
``governor`` answers its policy questions in server mode (bundle, leases, sync), ``daemon``
runs it (foreground or detached) and ``_http`` bounds slow request headers; ``run`` is ``ccgate
run``'s in-process gateway. ``lifecycle`` (up, down, status) and ``login`` (login, sync) drive
the daemon and the governor from the CLI, which is why they live here and not in ``machine`` or
``client``: both packages sit below the gateway.

Allowed imports: everything except ``ccgate.server`` and ``ccgate.cli``.
"""
