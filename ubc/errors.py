"""Exceptions of our own: bad input files and bad model bundles."""

from __future__ import annotations


class UBCError(Exception):
    """Base class of every error this package raises on purpose."""


class UBCInputError(UBCError):
    """An input file (a volume, a mask, a manifest) cannot be used; the message names it."""


class BundleError(UBCError):
    """A model bundle is missing, malformed, tampered with, or built for another machine."""
