"""Twisted adapters: turn sockets, timers and DNS into core events and run core actions."""
