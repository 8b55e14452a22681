"""Beam's private internals (the one home of their names) and ``patch()``."""
