"""The few plot shapes the round report draws (lines, markers, bars, reference lines, a
hatched cell grid), written as SVG text.

A plotting library would cost the summary step most of its time: importing matplotlib and
rendering the report's five figures took 1.6 s on a 2-core machine, against 5 ms here. Coordinates are SVG
user units (about a pixel); each figure's viewBox lets the page scale it to its width.
Text is plain <text> in the page's own font, and its width is estimated (an average
advance per character), which is enough to make room for labels."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

FONT_SIZE = 11
ADVANCE = 0.6  # a sans-serif character's average width, as a share of the font size
DASHES = {"-": None, "--": "6 3", ":": "1.5 2.5"}
# Marker outlines centred on (0, 0), given the radius r as text; drawn at their size rather
# than scaled, so that a stroke keeps its width.
SHAPES = {
    "o": "M0,-{r}A{r},{r} 0 1 0 0,{r}A{r},{r} 0 1 0 0,-{r}z",
    "s": "M-{r},-{r}H{r}V{r}H-{r}z",
    "x": "M-{r},-{r}L{r},{r}M-{r},{r}L{r},-{r}",
}


def esc(text: str) -> str:
    """Text or an attribute value for the SVG (XML: no HTML-only entities)."""
    return html.escape(text, quote=True)


def n(value: float) -> str:
    """A coordinate, to 0.1 unit."""
    text = f"{value:.1f}".removesuffix(".0")
    return "0" if text == "-0" else text


def text_width(text: str, size: float = FONT_SIZE) -> float:
    return len(text) * size * ADVANCE


def nice_ticks(low: float, high: float, most: int = 5, integer: bool = False) -> list[float]:
    """As many round-numbered ticks (1, 2 or 5 times a power of ten apart) as fit in
    [low, high] without exceeding `most`."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low] if math.isfinite(low) else []
    power = 10 ** math.floor(math.log10((high - low) / most))
    steps = [m * power for m in (0.5, 1, 2, 5, 10, 20)]
    if integer:
        steps = [s for s in steps if s >= 1 and s == int(s)] or [1.0]

    def span(step: float) -> tuple[int, int]:
        return math.ceil(low / step - 1e-9), math.floor(high / step + 1e-9)

    step = next((s for s in steps if span(s)[1] - span(s)[0] + 1 <= most), steps[-1])
    first, last = span(step)
    return [round(i * step, 12) for i in range(first, last + 1)]


def tick_label(value: float, ticks: Sequence[float]) -> str:
    if len(ticks) < 2:
        return f"{value:.4g}"
    decimals = max(0, -math.floor(math.log10(ticks[1] - ticks[0]) + 1e-9))
    return f"{value:.{decimals}f}"


def style(fill: str | None = None, stroke: str | None = None, width: float | None = None,
          dash: str = "-") -> str:
    parts = [f"fill:{fill or 'none'}"]
    if stroke:
        parts.append(f"stroke:{stroke}")
        if width is not None:
            parts.append(f"stroke-width:{width:g}")
        if DASHES[dash]:
            parts.append(f"stroke-dasharray:{DASHES[dash]}")
    return ";".join(parts)


def rect_path(x: float, y: float, width: float, height: float) -> str:
    return f"M{n(x)},{n(y)}h{n(width)}v{n(height)}h{n(-width)}z"


def text(x: float, y: float, content: str, *, anchor: str = "start", size: float | None = None,
         rotate: float = 0, bold: bool = False, baseline: str | None = None) -> str:
    attrs = [f'x="{n(x)}"', f'y="{n(y)}"']
    if anchor != "start":
        attrs.append(f'text-anchor="{anchor}"')
    if size is not None:
        attrs.append(f'font-size="{size:g}"')
    if bold:
        attrs.append('font-weight="bold"')
    if baseline:
        attrs.append(f'dominant-baseline="{baseline}"')
    if rotate:
        attrs.append(f'transform="rotate({rotate:g} {n(x)} {n(y)})"')
    return f"<text {' '.join(attrs)}>{esc(content)}</text>"


@dataclass(frozen=True)
class LegendEntry:
    """One legend key: a line (`dash`), a marker (`shape`) or a filled box (`fill`)."""

    label: str
    stroke: str | None = None
    width: float = 1.0
    dash: str = "-"
    shape: str | None = None
    fill: str | None = None
    hatched: bool = False


@dataclass
class Figure:
    """One SVG: its parts in drawing order and the definitions (markers, hatch) they use.
    `figure_id` prefixes the definitions' ids, so several figures share one HTML page."""

    figure_id: str
    width: float
    height: float = 0.0
    parts: list[str] = field(default_factory=list)
    defs: dict[str, str] = field(default_factory=dict)

    def add(self, *parts: str) -> None:
        self.parts.extend(parts)

    def marker(self, shape: str, size: float) -> str:
        """The id of a marker of this shape and diameter (in points)."""
        key = f"{self.figure_id}-m{shape}{n(size).replace('.', '_')}"
        if key not in self.defs:
            radius = n(size * 2 / 3)  # a point is 4/3 of a unit; half the diameter
            self.defs[key] = f'<path id="{key}" d="{SHAPES[shape].format(r=radius)}"/>'
        return key

    def hatch(self, background: str, colour: str) -> str:
        """The id of a pattern of diagonal lines over `background`."""
        key = f"h-{self.figure_id}"
        if key not in self.defs:
            self.defs[key] = (f'<pattern id="{key}" patternUnits="userSpaceOnUse" width="6" height="6">'
                              f'<path d="M0,0h6v6h-6z" style="fill:{background}"/>'
                              f'<path d="M0,6L6,0M-1,1L1,-1M5,7L7,5" style="{style(stroke=colour, width=0.8)}"/>'
                              "</pattern>")
        return key

    def use(self, marker: str, x: float, y: float, css: str | None = None) -> str:
        """A marker placed at (x, y); without `css` it takes its group's style."""
        styled = f' style="{css}"' if css else ""
        return f'<use href="#{marker}" x="{n(x)}" y="{n(y)}"{styled}/>'

    def legend(self, x: float, y: float, entries: Sequence[LegendEntry], *, columns: int | None = None,
               size: float = FONT_SIZE - 1) -> float:
        """Keys left to right (`columns` a row, default all), the first row's centre at y;
        returns the height used."""
        columns = columns or len(entries)
        widths = [28 + text_width(e.label, size) + 14 for e in entries]
        column_width = [max(widths[i::columns]) for i in range(columns)]
        row_height = size + 6
        for i, entry in enumerate(entries):
            left = x + sum(column_width[:i % columns])
            middle = y + row_height * (i // columns)
            if entry.shape:
                css = style(entry.fill, entry.stroke, entry.width)
                self.add(self.use(self.marker(entry.shape, 6), left + 11, middle, css))
            elif entry.fill or entry.hatched:
                fill = f"url(#{self.hatch(entry.fill or 'none', entry.stroke or '#000')})" if entry.hatched \
                    else entry.fill
                self.add(f'<path d="{rect_path(left + 2, middle - 5, 18, 10)}" '
                         f'style="{style(fill, entry.stroke, entry.width)}"/>')
            else:
                line = style(None, entry.stroke, entry.width, entry.dash)
                self.add(f'<path d="M{n(left)},{n(middle)}h22" style="{line}"/>')
            self.add(text(left + 28, middle, entry.label, size=size, baseline="central"))
        return row_height * math.ceil(len(entries) / columns)

    def svg(self) -> str:
        defs = f"<defs>{''.join(self.defs.values())}</defs>\n" if self.defs else ""
        return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {n(self.width)} {n(self.height)}" '
                f'width="{n(self.width)}" height="{n(self.height)}" font-size="{FONT_SIZE}">\n{defs}'
                + "\n".join(self.parts) + "\n</svg>")


@dataclass
class Axes:
    """A plot area of a Figure: its box (left, top, width, height) and the data ranges that
    map onto it. y grows upward unless `y_down` (a grid read top to bottom)."""

    figure: Figure
    left: float
    top: float
    width: float
    height: float
    xlim: tuple[float, float]
    ylim: tuple[float, float]
    y_down: bool = False

    @property
    def bottom(self) -> float:
        return self.top + self.height

    def x(self, value: float) -> float:
        lo, hi = self.xlim
        return self.left + (value - lo) / ((hi - lo) or 1) * self.width

    def y(self, value: float) -> float:
        lo, hi = self.ylim
        share = (value - lo) / ((hi - lo) or 1)
        return self.top + (share if self.y_down else 1 - share) * self.height

    def line(self, xs: Sequence[float], ys: Sequence[float], colour: str, width: float = 1.0,
             dash: str = "-") -> None:
        """A polyline, broken where a value is missing (NaN)."""
        d, pen_down = [], False
        for x, y in zip(xs, ys):
            if not math.isfinite(y):
                pen_down = False
                continue
            d.append(f"{'L' if pen_down else 'M'}{n(self.x(x))},{n(self.y(y))}")
            pen_down = True
        if d:
            self.figure.add(f'<path d="{"".join(d)}" style="{style(None, colour, width, dash)}"/>')

    def markers(self, points: Sequence[tuple[float, float]], shape: str, size: float, *, fill: str | None,
                stroke: str, width: float = 1.0, floor: bool = False) -> None:
        """One marker per point, in a group that carries their style; `floor`: the points'
        y is ignored and they sit on the bottom edge."""
        if not points:
            return
        marker = self.figure.marker(shape, size)
        uses = "".join(self.figure.use(marker, self.x(x), self.bottom - 4 if floor else self.y(y))
                       for x, y in points)
        self.figure.add(f'<g style="{style(fill, stroke, width)}">{uses}</g>')

    def bars(self, positions: Sequence[float], values: Sequence[float], thickness: float, colour: str, *,
             horizontal: bool = False) -> None:
        """Bars from 0 to each value; `thickness` in data units of the other axis."""
        d = []
        for at, value in zip(positions, values):
            if horizontal:
                top = self.y(at - thickness / 2)
                d.append(rect_path(self.x(0), top, self.x(value) - self.x(0), self.y(at + thickness / 2) - top))
            else:
                left = self.x(at - thickness / 2)
                d.append(rect_path(left, self.y(value), self.x(at + thickness / 2) - left, self.y(0) - self.y(value)))
        if d:
            self.figure.add(f'<path d="{"".join(d)}" style="fill:{colour}"/>')

    def vline(self, value: float, colour: str, width: float = 1.0, dash: str = "-") -> None:
        self.figure.add(f'<path d="M{n(self.x(value))},{n(self.top)}V{n(self.bottom)}" '
                        f'style="{style(None, colour, width, dash)}"/>')

    def xspan(self, start: float, end: float, colour: str) -> None:
        self.figure.add(f'<path d="{rect_path(self.x(start), self.top, self.x(end) - self.x(start), self.height)}" '
                        f'style="fill:{colour}"/>')

    def grid(self, ticks: Sequence[float], vertical: bool = False) -> None:
        """Light lines across the box at these ticks (of y; of x when `vertical`)."""
        if vertical:
            d = "".join(f"M{n(self.x(t))},{n(self.top)}V{n(self.bottom)}" for t in ticks)
        else:
            d = "".join(f"M{n(self.left)},{n(self.y(t))}h{n(self.width)}" for t in ticks)
        if d:
            self.figure.add(f'<path d="{d}" style="{style(None, "#eaeef2", 0.8)}"/>')

    def yaxis(self, ticks: Sequence[float], labels: Sequence[str] | None = None, *, grid: bool = False,
              label: str | None = None) -> None:
        """Tick labels left of the box (and grid lines across it), and the axis label turned
        upright along it."""
        labels = labels if labels is not None else [tick_label(t, ticks) for t in ticks]
        if grid:
            self.grid(ticks)
        for t, tick in zip(ticks, labels):
            self.figure.add(text(self.left - 5, self.y(t), tick, anchor="end", baseline="central"))
        if label:
            room = max((text_width(t) for t in labels), default=0) + 14
            middle = self.top + self.height / 2
            self.figure.add(text(self.left - room, middle, label, anchor="middle", rotate=-90))

    def xaxis(self, ticks: Sequence[float], labels: Sequence[str] | None = None, *, tilt: float = 0,
              top: bool = False, label: str | None = None) -> None:
        """Tick labels under the box (or over it), turned `tilt` degrees when they are many,
        and the axis label under them."""
        labels = labels if labels is not None else [tick_label(t, ticks) for t in ticks]
        for t, tick in zip(ticks, labels):
            if top:
                self.figure.add(text(self.x(t), self.top - 5, tick, rotate=-90, baseline="central"))
            elif tilt:
                self.figure.add(text(self.x(t), self.bottom + 10, tick, anchor="end", rotate=-tilt))
            else:
                self.figure.add(text(self.x(t), self.bottom + 14, tick, anchor="middle"))
        if label:
            self.figure.add(text(self.left + self.width / 2, self.bottom + 32, label, anchor="middle"))

    def frame(self, left: bool = True, bottom: bool = True) -> None:
        """The left and bottom axis lines (no top or right spine)."""
        d = (f"M{n(self.left)},{n(self.top)}V{n(self.bottom)}" if left else "") + \
            (f"M{n(self.left)},{n(self.bottom)}H{n(self.left + self.width)}" if bottom else "")
        if d:
            self.figure.add(f'<path d="{d}" style="{style(None, "#1f2328", 0.8)}"/>')

    def title(self, content: str, bold: bool = False) -> None:
        self.figure.add(text(self.left, self.top - 7, content, bold=bold, size=FONT_SIZE + 1))

    def annotate(self, x: float, y: float, content: str, dx: float = 0, size: float | None = None) -> None:
        self.figure.add(text(self.x(x) + dx, self.y(y), content, size=size, baseline="central"))
