"""Several worker processes, on one machine or several, on one batch whose ledger is in PostgreSQL.

``members`` says who works on a batch, in which run, and takes over the items of a worker that died;
``shared`` keeps the workers together within each account's quota and the batch's budget; ``worker`` is what
the engine asks of the fleet. docs/fleet.md tells how to run one.
"""
