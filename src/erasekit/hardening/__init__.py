"""Hardening an erasure against attack (runner.py) and the `erasekit harden` command (commands.py)."""
