"""sequence losses."""

__all__ = []
LOSS_NAMES = ()
