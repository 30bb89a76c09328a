"""fl_tasks/coordinator/svgplot.py: tick choice against its definition, and the shapes'
SVG read back with xml.etree."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest

from fl_tasks.coordinator.svgplot import Axes, Figure, LegendEntry, nice_ticks, tick_label

SVG = "{http://www.w3.org/2000/svg}"


@pytest.mark.parametrize("low, high, most", [(0.302, 0.318, 4), (0.805, 0.826, 5), (0, 1, 6), (0, 0.46, 6),
                                             (-3.5, 120.0, 5), (1e-7, 3e-7, 5), (0, 1082.5, 6), (41.0, 41.5, 3)])
def test_ticks_are_round_evenly_spaced_inside_the_range_and_as_many_as_fit(low, high, most):
    ticks = nice_ticks(low, high, most)
    assert 2 <= len(ticks) <= most
    assert low - 1e-12 <= ticks[0] and ticks[-1] <= high + 1e-12
    steps = {round(b - a, 15) for a, b in zip(ticks, ticks[1:])}
    assert len({round(s / max(steps), 9) for s in steps}) == 1  # even
    step = max(steps)
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert min(abs(mantissa - m) for m in (1, 2, 5)) < 1e-6, step
    assert all(abs(t / step - round(t / step)) < 1e-6 for t in ticks)  # multiples of the step
    # The next smaller round step would have needed more than `most` ticks.
    smaller = {1: 0.5, 2: 1, 5: 2}[round(mantissa)] * 10 ** math.floor(math.log10(step))
    assert math.floor(high / smaller + 1e-9) - math.ceil(low / smaller - 1e-9) + 1 > most


def test_integer_ticks_and_their_labels():
    ticks = nice_ticks(0, 5.25, 4, integer=True)
    assert ticks == [0, 2, 4] and [tick_label(t, ticks) for t in ticks] == ["0", "2", "4"]
    ticks = nice_ticks(0.302, 0.318, 4)
    assert [tick_label(t, ticks) for t in ticks] == ["0.305", "0.310", "0.315"]
    assert nice_ticks(3.0, 3.0) == [3.0] and nice_ticks(math.nan, 1.0) == []


def parse(fig: Figure) -> ET.Element:
    fig.height = fig.height or 100
    return ET.fromstring(fig.svg())


def test_axes_map_data_onto_the_box_both_ways():
    fig = Figure("f", 200)
    up = Axes(fig, 10, 20, 100, 50, (0, 10), (0, 5))
    down = Axes(fig, 10, 20, 100, 50, (0, 10), (0, 5), y_down=True)
    assert (up.x(0), up.x(10), up.x(5)) == (10, 110, 60)
    assert (up.y(0), up.y(5), down.y(0), down.y(5)) == (70, 20, 20, 70)


def test_a_line_breaks_where_a_value_is_missing():
    fig = Figure("f", 200)
    ax = Axes(fig, 0, 0, 100, 100, (0, 4), (0, 1))
    ax.line(range(5), [0, 1, math.nan, 1, 0], "#000")
    (path,) = parse(fig).iter(f"{SVG}path")
    assert path.get("d") == "M0,100L25,0M75,0L100,100"


def test_markers_share_one_definition_and_keep_their_stroke_width():
    fig = Figure("fig-a", 200)
    ax = Axes(fig, 0, 0, 100, 100, (0, 2), (0, 1))
    ax.markers([(0, 0), (1, 0.5), (2, 1)], "o", 6, fill="#ffffff", stroke="#cf222e", width=1.5)
    ax.markers([(1, math.nan)], "x", 6, fill=None, stroke="#6e7781", floor=True)
    svg = parse(fig)
    definitions = {p.get("id"): p for p in svg.find(f"{SVG}defs")}
    assert len(definitions) == 2 and not any(p.get("transform") for p in definitions.values())
    groups = list(svg.iter(f"{SVG}g"))
    assert groups[0].get("style") == "fill:#ffffff;stroke:#cf222e;stroke-width:1.5"
    uses = [u for g in groups for u in g.iter(f"{SVG}use")]
    assert [(u.get("x"), u.get("y")) for u in uses] == [("0", "100"), ("50", "50"), ("100", "0"), ("50", "96")]
    assert {u.get("href") for u in uses} == {f"#{i}" for i in definitions}


def test_bars_legend_and_hatch():
    fig = Figure("fig-b", 300)
    ax = Axes(fig, 0, 0, 100, 40, (0, 10), (-0.5, 1.5), y_down=True)
    ax.bars([0, 1], [5, 10], 0.5, "#54aeff", horizontal=True)
    fig.legend(0, 60, [LegendEntry("drifted", fill="#f4a582", stroke="#b2182b", hatched=True),
                       LegendEntry("p90", stroke="#000", dash="--")])
    svg = parse(fig)
    bars, patch, line = svg.findall(f"{SVG}path")  # the figure's own, not the hatch pattern's
    assert bars.get("d") == "M0,5h50v10h-50zM0,25h100v10h-100z"
    assert patch.get("style").startswith("fill:url(#h-fig-b)") and svg.find(f"{SVG}defs/{SVG}pattern") is not None
    assert "stroke-dasharray:6 3" in line.get("style")
    assert [t.text for t in svg.iter(f"{SVG}text")] == ["drifted", "p90"]
