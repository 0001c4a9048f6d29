"""Orchestration: the one layer that sequences spec → image → backend → registry.

The public names are re-exported lazily by :mod:`mvm`; nothing outside :mod:`mvm` and this
package's own tests should import from here.
"""
