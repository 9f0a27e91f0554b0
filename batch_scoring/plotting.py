"""matplotlib on demand: the plots of evaluate and decay are optional (the bench extra)."""

from __future__ import annotations

from types import ModuleType

from batch_scoring.errors import BatchInputError


def pyplot() -> ModuleType:
    """matplotlib.pyplot with the file-only Agg backend, or a one-line error naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise BatchInputError("--plot needs matplotlib: pip install 'adscore[bench]'") from exc
    return plt
