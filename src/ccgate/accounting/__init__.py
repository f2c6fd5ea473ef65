"""Accounting: what a request costs, from tokens to integer micro-dollars.

Pure functions over plain data; the only I/O is reading and installing a price table file.

``metering`` reads usage out of an upstream response, ``pricing`` turns usage into a charge,
``periods`` names budget windows, ``repricing`` prices stored rows again under a newer table,
``litellm_prices`` imports LiteLLM's table, and ``reconcile`` compares ccgate's totals with a
provider's report. Both the daemon and the server count money with these modules.

Allowed imports: the base modules (``ccgate.errors``, ``env``, ``paths``, ``_files``, ``wire``).
"""
