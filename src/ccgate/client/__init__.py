"""Client: talking to a ccgate server from a laptop.

``remote`` is the device client (enrolment, bundle, leases, usage) the daemon and ``ccgate
login`` use, ``admin`` the admin API client the ``ccgate admin`` commands use, ``profiles`` the
saved binding to a server (its secrets live in the machine's secret store).

Allowed imports: base, ``ccgate.accounting``, ``ccgate.policy``, ``ccgate.machine``.
"""
