"""How a pull copy turns extents into ranges: pure, checked against a unit-by-unit model."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from qmpbackup.images.pull_copy import _cluster_aligned, _intersect
from qmpbackup.images.qcow2_writer import CLUSTER
from qmpbackup.nbd import Extent


@st.composite
def layout(draw: st.DrawFn) -> tuple[int, list[Extent], list[tuple[int, int]]]:
    """A size, allocation extents covering it, and sorted disjoint dirty ranges."""
    size = draw(st.integers(1, 40))
    cuts = sorted(set(draw(st.lists(st.integers(1, size - 1), max_size=10)))) if size > 1 else []
    edges = [0, *cuts, size]
    extents = [
        Extent(a, b - a, draw(st.sampled_from([0, 2, 3]))) for a, b in itertools.pairwise(edges)
    ]
    points = sorted(set(draw(st.lists(st.integers(0, size), max_size=12))))
    dirty = [(a, b) for a, b in zip(points[::2], points[1::2], strict=False) if a < b]
    return size, extents, dirty


@settings(max_examples=300)
@given(layout())
def test_intersect_matches_a_unit_model(
    case: tuple[int, list[Extent], list[tuple[int, int]]],
) -> None:
    _, extents, dirty = case
    found = list(_intersect(iter(extents), dirty))
    model = {u: e.flags for e in extents for u in range(e.offset, e.offset + e.length)
             if any(a <= u < b for a, b in dirty)}  # fmt: skip
    got = {u: flags for offset, length, flags in found for u in range(offset, offset + length)}
    assert got == model
    assert [o for o, _, _ in found] == sorted(o for o, _, _ in found)


@settings(max_examples=300)
@given(st.data())
def test_cluster_aligned_covers_everything_and_keeps_whole_zero_clusters(
    data: st.DataObject,
) -> None:
    unit = CLUSTER // 4
    size = data.draw(st.integers(1, 24)) * unit
    points = sorted(set(data.draw(st.lists(st.integers(0, size // unit), max_size=12))))
    spans = [
        (a * unit, (b - a) * unit) for a, b in zip(points[::2], points[1::2], strict=False) if a < b
    ]
    kinds = data.draw(st.lists(st.booleans(), min_size=len(spans), max_size=len(spans)))
    raw_data = [s for s, zero in zip(spans, kinds, strict=True) if not zero]
    raw_zeros = [s for s, zero in zip(spans, kinds, strict=True) if zero]
    out_data, out_zeros = _cluster_aligned(raw_data, raw_zeros, size)
    for offset, length in out_data + out_zeros:
        assert offset % CLUSTER == 0 and (
            (offset + length) % CLUSTER == 0 or offset + length == size
        )
    covered = {u for o, n in out_data + out_zeros for u in range(o, o + n, unit)}
    wanted = {u for o, n in spans for u in range(o, o + n, unit)}
    assert wanted <= covered
    # Zero clusters only where every unit was meant to read as zero, and never twice.
    zero_units = {u for o, n in raw_zeros for u in range(o, o + n, unit)}
    for offset, length in out_zeros:
        assert set(range(offset, offset + length, unit)) <= zero_units
    data_units = {u for o, n in out_data for u in range(o, o + n, unit)}
    assert not data_units & {u for o, n in out_zeros for u in range(o, o + n, unit)}
