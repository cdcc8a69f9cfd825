"""regression losses."""

__all__ = []
LOSS_NAMES = ()
