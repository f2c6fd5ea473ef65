"""Policy: what a request may do. The decisions are pure functions of their inputs and ``now``.

``limits`` is admission (model allowlists, rate limits, key expiry), ``wallet`` spends budgets
from leases, ``grants`` computes the slice the server grants a lease, and ``bundle`` is the
signed policy bundle the server makes and the daemon verifies. The server and the daemon share
them, which is why none of them may reach a process-specific module.

Allowed imports: base, ``ccgate.accounting``.
"""
