"""Exceptions of our own: bad input files, bad model bundles, outputs that cannot be
written."""

from __future__ import annotations


class UBCError(Exception):
    """Base class of every error this package raises on purpose."""


class UBCInputError(UBCError):
    """An input file (a volume, a mask, a manifest) cannot be used; the message names it."""


class BundleError(UBCError):
    """A model bundle is missing, malformed, tampered with, or built for another machine."""


class OutputFault(UBCError):
    """The run's outputs cannot be written (a folder not writable, a full disk): not the
    fault of any input, so the run stops at once instead of failing every case; the message
    names the path. Rows already written stay, and a re-run resumes."""


#: errno values that mean the place we write to is at fault, not what we write
ENVIRONMENT_ERRNOS = frozenset({"ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EIO",
                                "EMFILE", "ENFILE"})


def is_environment_fault(exc: BaseException) -> bool:
    """True for an ``OSError`` that says the disk or the folder is at fault."""
    import errno

    return isinstance(exc, OSError) and exc.errno is not None \
        and errno.errorcode.get(exc.errno) in ENVIRONMENT_ERRNOS
