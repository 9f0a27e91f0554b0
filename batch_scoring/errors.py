"""The errors a batch job reports to its user as one line (the CLI exits with status 2)."""

from __future__ import annotations


class BatchError(Exception):
    """Base of the failures a batch job reports without a traceback."""


class BatchInputError(BatchError):
    """An input file is missing, unreadable, or lacks a column (or a type) the job needs."""


class FeatureSourceError(BatchError):
    """The feature store or snapshot cannot be read, or holds features of another schema."""


class ManifestMismatch(BatchError):
    """The output folder holds a run of another model, input or chunk size."""
