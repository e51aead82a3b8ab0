"""The sans-IO protocol core: no sockets, no reactor, no clock, no global randomness.

Each stream is a state machine: ``handle(event) -> list[Action]``.  ``tests/unit``
checks that nothing in here imports Twisted.
"""
