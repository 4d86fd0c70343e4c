"""Zero blocks: filling buffers for holes and spotting all-zero data.

Both compare or copy against one shared zero ``bytes``, allocated with calloc, so it costs
no resident memory and every check is a ``memcmp``.
"""

from __future__ import annotations

_ZEROS = bytes(32 << 20)
_ZVIEW = memoryview(_ZEROS)
_STEP = len(_ZEROS)


def fill_zero(buf: memoryview) -> None:
    """Set every byte of ``buf`` to zero."""
    for pos in range(0, len(buf), _STEP):
        end = min(pos + _STEP, len(buf))
        buf[pos:end] = _ZVIEW[: end - pos]


def is_zero(buf: memoryview) -> bool:
    """True when every byte of ``buf`` is zero."""
    # bytes.startswith takes any buffer and ends in memcmp; memoryview == compares per item.
    return all(_ZEROS.startswith(buf[pos : pos + _STEP]) for pos in range(0, len(buf), _STEP))


def zero_view(n: int) -> memoryview:
    """A read-only view of ``n`` zero bytes (at most 32 MiB)."""
    return _ZVIEW[:n]
