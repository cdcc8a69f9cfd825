"""large_vocab losses."""

__all__ = []
LOSS_NAMES = ()
