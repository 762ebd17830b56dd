"""Locust scenarios against the voucher engine's HTTP API.

One module per scenario (``flash_sale``, ``checkout``, ``browse``, ``admin``), each a
locustfile of its own; ``plan`` prepares a run (no Locust imports), ``common`` holds what
the Locust users share. Run them with ``python -m loadtests.run_scenario <name>`` or with
Locust directly (see ``loadtests/locustfile.py``).
"""
