"""Manifests: discovering and probing videos, frozen shards, labels, and the run-directory ledger.

Nothing here imports a decoder, torch or timm: these modules are what light commands run.
"""
