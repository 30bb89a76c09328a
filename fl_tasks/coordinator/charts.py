"""A round's HTML report: one self-contained page (inline SVG plots, inline CSS, no JS,
no fonts, nothing fetched) that reads the same opened from S3 or from an MLflow artifact
view with no network: the round's header, its metrics next to the earlier rounds',
participation, the weight of each silo, the update latency, the drift heat map and why
updates were rejected or declined. The plots are written by `svgplot`: no plotting library
to import in the summary step."""

from __future__ import annotations

import html
import math
import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fl_tasks.coordinator.svgplot import (FONT_SIZE, Axes, Figure, LegendEntry, esc, nice_ticks, rect_path, style,
                                          text_width)

if TYPE_CHECKING:  # history pulls in the object store (boto3); the types alone are enough here
    from fl_tasks.coordinator.drift import DriftTable
    from fl_tasks.coordinator.history import RoundRecord

# decision -> (what a person reads, colour); the colours are also the header badge's.
DECISIONS: dict[str, tuple[str, str]] = {
    "promoted": ("promoted", "#1a7f37"),
    "rejected": ("rolled back", "#cf222e"),
    "no_model": ("no model", "#6e7781"),
    "refused": ("refused", "#9a6700"),
}
MAX_ROUNDS_SHOWN = 50  # the history keeps up to 500; beyond ~50 the x axis is unreadable and the page grows
MAX_OTHER_METRICS = 8  # panels besides the primary metric's
MAX_DRIFT_COLUMNS = 80  # heat-map columns; those that drifted somewhere come first
MAX_BAR_SILOS = 40  # above this the latency plot is a histogram rather than a bar per silo
LABEL_CHARS = 24  # axis labels; tooltips and tables carry the full text
WIDTH, MARGIN, RIGHT = 760, 56, 12  # a figure's width; room for y tick labels on the left, and on the right
ROW, CELL = 20, 16  # a silo's bar row; a drift heat-map cell

CANDIDATE_COLOUR, CHAMPION_COLOUR = "#0969da", "#57606a"
DRIFTED_COLOUR, DRIFTED_EDGE, STEADY_COLOUR, NO_SCORE_COLOUR = "#f4a582", "#b2182b", "#d1e5f0", "#eeeeee"


def render_round_report(history: Sequence[RoundRecord], current: RoundRecord, drift: DriftTable | None) -> str:
    """The round's report page. `history`: the federation's earlier rounds, oldest first
    (a record of `current` in it is replaced by `current`); `drift`: the round's drift
    table, None when no silo was asked for scores."""
    rounds, total = _rounds(history, current)
    sections = [
        _header(current, total, len(rounds)),
        _metrics_section(rounds),
        _participation_section(rounds),
        _weights_section(current),
        _latency_section(current),
        _drift_section(drift, current.round_id),
        _reasons_section("rejected", "Rejected updates by reason", current.metrics.rejected_by_reason,
                         "No update was rejected."),
        _reasons_section("declined", "Declined updates by reason", current.metrics.declined_by_reason,
                         "No silo declined."),
    ]
    title = f"{_e(current.metrics.federation)} — round {_e(current.round_id)}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{title}</title><style>{_CSS}</style></head>\n<body>\n" + "\n".join(sections) + "\n</body></html>\n")


_CSS = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:1.5rem auto;max-width:60rem;"
    "padding:0 1rem;color:#1f2328;line-height:1.4}"
    "h1{font-size:1.4rem;margin:0 0 .5rem}h2{font-size:1.1rem;margin:1.8rem 0 .4rem;border-bottom:1px solid #d0d7de}"
    "dl{display:grid;grid-template-columns:max-content 1fr;gap:.15rem 1rem;margin:0}dt{color:#57606a}dd{margin:0}"
    ".badge{display:inline-block;padding:.05rem .5rem;border-radius:1rem;color:#fff;font-weight:600}"
    "figure{margin:.3rem 0}svg{max-width:100%;height:auto}svg *{stroke-linejoin:round;stroke-linecap:butt}"
    "svg text{font-family:'DejaVu Sans',Verdana,Arial,sans-serif}"
    "table{border-collapse:collapse;margin:.3rem 0}td,th{padding:.15rem .6rem;border-bottom:1px solid #eaeef2;"
    "text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}"
    ".note{color:#57606a}ul{margin:.3rem 0;padding-left:1.2rem}"
    "g.drift-cell:hover path{stroke:#000;stroke-width:1.5}"
)


# -- text ---------------------------------------------------------------------------------

def _clean(value: Any, limit: int | None = None) -> str:
    """Data as printable text: control characters and the like (invalid in the SVG's XML)
    become '?', and long names are cut with an ellipsis where space is short."""
    text = "".join(" " if c in "\t\n\r" else "?" if unicodedata.category(c) in ("Cc", "Cs") or c in "\ufffe\uffff"
                   else c for c in str(value))
    return text if limit is None or len(text) <= limit else text[:limit - 1] + "…"


def _e(value: Any, limit: int | None = None) -> str:
    return html.escape(_clean(value, limit), quote=True)


def _num(value: float | int | None) -> str:
    if value is None:
        return "–"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} s"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _bytes(value: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"


def _table(table_id: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A small HTML table; numbers are right-aligned, everything else escaped."""
    def cell(value: Any) -> str:
        if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return f'<td class="n">{_num(value)}</td>'
        return f"<td>{_e(value)}</td>"
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _section(section_id: str, heading: str, *parts: str) -> str:
    return f'<section id="{section_id}"><h2>{html.escape(heading)}</h2>\n' + "\n".join(p for p in parts if p) + \
        "\n</section>"


# -- figures ------------------------------------------------------------------------------

def _svg(fig: Figure, caption: str) -> str:
    return f'<figure id="{fig.figure_id}"><figcaption class="note">{caption}</figcaption>\n{fig.svg()}</figure>'


def _round_label_room(rounds: Sequence[RoundRecord]) -> float:
    """The height the round labels under an x axis take: turned 45 degrees when many."""
    if len(rounds) > 8:
        return max(text_width(_clean(r.round_id, 12)) for r in rounds) * 0.71 + 16
    return 22


def _round_axis(ax: Axes, rounds: Sequence[RoundRecord], labels: bool = True, most: int = 25) -> None:
    """Rounds along x, at most `most` labelled; no tick marks (the labels place the rounds)."""
    step = max(1, math.ceil(len(rounds) / most))
    positions = list(range(0, len(rounds), step))
    if labels:
        ax.xaxis(positions, [_clean(rounds[i].round_id, 12) for i in positions], tilt=45 if len(rounds) > 8 else 0)


def _this_round(ax: Axes, rounds: Sequence[RoundRecord]) -> None:
    """This round shaded, under everything else on the panel."""
    ax.xspan(len(rounds) - 1.45, len(rounds) - 0.55, "#fff3c4")


def _round_axes(fig: Figure, left: float, top: float, width: float, height: float, rounds: Sequence[RoundRecord],
                ylim: tuple[float, float]) -> Axes:
    return Axes(fig, left, top, width, height, (-0.6, len(rounds) - 0.4), ylim)


# -- sections -----------------------------------------------------------------------------

def _rounds(history: Sequence[RoundRecord], current: RoundRecord) -> tuple[list[RoundRecord], int]:
    """The rounds to plot, oldest first, ending with `current`, and how many there are in all.
    A round that ran again replaces its earlier record and moves to the end, as in
    FederationHistory.record."""
    by_id: dict[str, RoundRecord] = {}
    for entry in [*history, current]:
        by_id.pop(entry.round_id, None)
        by_id[entry.round_id] = entry
    rounds = list(by_id.values())
    return rounds[-MAX_ROUNDS_SHOWN:], len(rounds)


def _header(current: RoundRecord, total: int, shown: int) -> str:
    label, colour = DECISIONS.get(current.decision, (current.decision, "#57606a"))
    m, mlflow = current.metrics, current.mlflow
    if mlflow:
        model = f"{_e(mlflow.get('model_name', '?'))} version {_e(mlflow.get('version', '–'))}"
        extra = [f"{k.replace('_', ' ')} {_e(mlflow[k])}" for k in ("run_id", "experiment_id") if mlflow.get(k)]
        mlflow_text = model + (f' <span class="note">({", ".join(extra)})</span>' if extra else "")
    else:
        mlflow_text = '<span class="note">not recorded</span>'
    rows = [
        ("Decision", f'<span class="badge" id="decision" style="background:{colour}">{_e(label)}</span>'),
        ("Version", f"{_e(current.version or '–')} "
                    f'<span class="note">(base {_e(current.base_version or "–")})</span>'),
        ("Reason", _e(current.reason or "–")),
        ("Started by", f'{_e(current.triggered_by or "–")} <span class="note">({_e(current.run_type)} run '
                       f"{_e(current.run_id)})</span>"),
        ("Finished", _e(current.finished_at)),
        ("MLflow", mlflow_text),
        ("Updates", f"{m.clients_committed} of {m.clients_expected} silos committed "
                    f"({_percent(m.participation_rate)}), {m.clients_accepted} accepted; "
                    f"{_bytes(m.bytes_down)} down, {_bytes(m.bytes_up)} up"),
    ]
    if total > shown:
        rows.append(("History", f"the plots show the last {shown} of {total} rounds"))
    items = "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in rows)
    return (f'<header id="header"><h1>{_e(m.federation)} — round {_e(current.round_id)}</h1>'
            f"<dl>{items}</dl></header>")


def _primary_metric(rounds: Sequence[RoundRecord]) -> str | None:
    for entry in reversed(rounds):
        if entry.metrics.primary_metric:
            return entry.metrics.primary_metric
    return None


def _metrics_section(rounds: Sequence[RoundRecord]) -> str:
    current, primary = rounds[-1].metrics, _primary_metric(rounds)
    names = sorted({k for r in rounds for k in (*r.metrics.candidate, *r.metrics.champion)})
    if not names:
        return _section("metrics-by-round", "Metrics by round",
                        '<p class="note">No round has candidate or champion metrics yet.</p>')
    others = [n for n in names if n != primary]
    dropped = others[MAX_OTHER_METRICS:]
    panels = ([primary] if primary in names else []) + others[:MAX_OTHER_METRICS]
    emphasised = primary in names
    fig = Figure("fig-metrics-by-round", WIDTH)
    seen = list(dict.fromkeys(r.decision for r in rounds))  # a set would reorder by hash seed
    entries = [LegendEntry("candidate", stroke=CANDIDATE_COLOUR, width=2),
               LegendEntry("champion", stroke=CHAMPION_COLOUR, dash="--")]
    entries += [LegendEntry(label, **_marker_style(decision)) for decision, (label, _) in DECISIONS.items()
                if decision in seen]
    top = 12 + fig.legend(MARGIN, 12, entries) + 16
    below = _round_label_room(rounds) + 24  # a panel's round labels, then the next panel's title
    half = (WIDTH - 2 * MARGIN - RIGHT) / 2
    small = panels[1:] if emphasised else panels
    if emphasised:
        _metric_panel(fig, MARGIN, top, WIDTH - MARGIN - RIGHT, 170, primary, rounds, main=True)
        top += 170 + below
    for i, name in enumerate(small):
        _metric_panel(fig, MARGIN + (i % 2) * (half + MARGIN), top + (i // 2) * (110 + below), half, 110, name,
                      rounds, main=False)
    fig.height = top + math.ceil(len(small) / 2) * (110 + below) - 20
    caption = ("Candidate (solid) and champion (dashed) by round; markers give each round's decision "
               "(filled: promoted, hollow: rolled back; ✕ at the bottom: no candidate). The shaded round is this one.")
    parts = [_svg(fig, caption)]
    if dropped:
        parts.append(f'<p class="note">Not plotted: {_e(", ".join(dropped))}.</p>')
    this_round = sorted(set(current.candidate) | set(current.champion), key=lambda n: (n != primary, n))
    if this_round:
        parts.append(_table("metrics-this-round", ["metric (this round)", "candidate", "champion"],
                            [[f"{n} (primary)" if n == primary else n, current.candidate.get(n),
                              current.champion.get(n)] for n in this_round]))
    return _section("metrics-by-round", "Metrics by round", *parts)


def _metric_panel(fig: Figure, left: float, top: float, width: float, height: float, name: str,
                  rounds: Sequence[RoundRecord], main: bool) -> None:
    """One metric's candidate and champion by round, with each round's decision marked."""
    champion = [r.metrics.champion.get(name, math.nan) for r in rounds]
    candidate = [r.metrics.candidate.get(name, math.nan) for r in rounds]
    values = [v for v in (*champion, *candidate) if math.isfinite(v)]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    pad = (high - low) * 0.08 or abs(low) * 0.05 or 0.5
    ax = _round_axes(fig, left, top, width, height, rounds, (low - pad, high + pad))
    _this_round(ax, rounds)
    ax.yaxis(nice_ticks(low - pad, high + pad, 5 if main else 4), grid=True)
    ax.frame()
    xs = range(len(rounds))
    ax.line(xs, champion, CHAMPION_COLOUR, 1.6 if main else 1, dash="--")
    ax.line(xs, candidate, CANDIDATE_COLOUR, 2.2 if main else 1.2)
    size = 7 if main else 5
    for decision in dict.fromkeys(r.decision for r in rounds):
        points = [(x, v) for x, r, v in zip(xs, rounds, candidate) if r.decision == decision]
        ax.markers([p for p in points if math.isfinite(p[1])], size=size, **_marker_style(decision))
        # No candidate to place: the round is marked on the floor of the panel.
        ax.markers([p for p in points if not math.isfinite(p[1])], size=size, floor=True,
                   **_marker_style("no_model" if decision == "promoted" else decision,
                                   DECISIONS.get(decision, (decision, "#57606a"))[1]))
    ax.title(f"{_clean(name, 40)} (primary)" if main else _clean(name, 40), bold=main)
    _round_axis(ax, rounds, most=25 if main else 10)


def _marker_style(decision: str, colour: str | None = None) -> dict[str, Any]:
    # Filled or hollow as well as coloured, so the decision reads without colour too.
    colour = colour or DECISIONS.get(decision, (decision, "#57606a"))[1]
    if decision == "promoted":
        return {"shape": "o", "fill": colour, "stroke": colour, "width": 1.0}
    if decision in ("rejected", "refused"):
        return {"shape": "o" if decision == "rejected" else "s", "fill": "#ffffff", "stroke": colour, "width": 1.5}
    return {"shape": "x", "fill": None, "stroke": colour, "width": 1.5}


def _participation_section(rounds: Sequence[RoundRecord]) -> str:
    fig = Figure("fig-participation", WIDTH)
    width = WIDTH - MARGIN - RIGHT
    rate = _round_axes(fig, MARGIN, 10, width, 90, rounds, (0, 105))
    _this_round(rate, rounds)
    rate.yaxis([0, 25, 50, 75, 100], grid=True, label="participation %")
    rate.frame()
    xs = range(len(rounds))
    shares = [100 * r.metrics.participation_rate for r in rounds]
    rate.line(xs, shares, CANDIDATE_COLOUR)
    rate.markers(list(zip(xs, shares)), "o", 3, fill=CANDIDATE_COLOUR, stroke=CANDIDATE_COLOUR)
    most = max(max(r.metrics.clients_expected for r in rounds), 1)
    ticks = nice_ticks(0, most, 4, integer=True)
    counts = _round_axes(fig, MARGIN, 136, width, 110, rounds, (0, max(most * 1.05, ticks[-1])))
    _this_round(counts, rounds)
    counts.yaxis(ticks, grid=True, label="silos")
    counts.frame()
    # Nested bars: expected contains committed contains accepted.
    bars = [("expected", "#eaeef2", 0.8, "clients_expected"), ("committed", "#54aeff", 0.55, "clients_committed"),
            ("accepted", "#1a7f37", 0.3, "clients_accepted")]
    for _, colour, thickness, attribute in bars:
        counts.bars(xs, [getattr(r.metrics, attribute) for r in rounds], thickness, colour)
    fig.legend(MARGIN, 120, [LegendEntry(label, fill=colour) for label, colour, _, _ in bars])
    _round_axis(counts, rounds)
    fig.height = counts.bottom + _round_label_room(rounds) + 4
    m = rounds[-1].metrics
    text = (f"<p>This round: <b>{_percent(m.participation_rate)}</b> participation, {m.clients_committed} of "
            f"{m.clients_expected} silos committed, {m.clients_accepted} accepted.</p>")
    return _section("participation", "Participation by round", text,
                    _svg(fig, "Share of the expected silos that committed, and silo counts, by round."))


def _silo_bars(figure_id: str, silos: Sequence[str], values: Sequence[float], colour: str, legend_room: float,
               xmax: float) -> tuple[Figure, Axes]:
    """A horizontal bar per silo, top to bottom, named on the left."""
    fig = Figure(figure_id, WIDTH)
    labels = [_clean(s, LABEL_CHARS) for s in silos]
    left = max(text_width(label) for label in labels) + 12
    ax = Axes(fig, left, 10, WIDTH - left - legend_room, ROW * len(silos), (0, xmax), (-0.5, len(silos) - 0.5),
              y_down=True)
    ax.grid(nice_ticks(0, xmax, 6), vertical=True)
    ax.bars(range(len(silos)), values, 0.65, colour, horizontal=True)
    ax.yaxis(list(range(len(silos))), labels)
    ax.frame()
    fig.height = ax.bottom + 42
    return fig, ax


def _weights_section(current: RoundRecord) -> str:
    m = current.metrics
    if not m.weights:
        why = ("no update was accepted" if m.clients_accepted == 0 else
               "the aggregation rule gives no per-silo weights (e.g. median or trimmed mean: "
               "every accepted update counts alike)")
        return _section("weights", "Weight per silo", f'<p class="note" id="no-weights">No weights this round: {why}.</p>')
    silos = sorted(m.weights, key=lambda s: (-m.weights[s], s))
    xmax = max(m.weights.values()) * 1.15 or 1
    fig, ax = _silo_bars("fig-weights", silos, [m.weights[s] for s in silos], CANDIDATE_COLOUR, 40, xmax)
    for y, silo in enumerate(silos):
        ax.annotate(m.weights[silo], y, f"{m.weights[silo]:.3f}", dx=3, size=FONT_SIZE - 2)
    ax.vline(1 / len(silos), CHAMPION_COLOUR, dash=":")
    ax.xaxis(nice_ticks(0, xmax, 6), label="share of the candidate (dotted: equal shares)")
    table = _table("weights-table", ["silo", "weight"], [[s, m.weights[s]] for s in silos])
    return _section("weights", "Weight per silo",
                    _svg(fig, "Each accepted silo's share of the candidate this round."), table)


def _latency_section(current: RoundRecord) -> str:
    m = current.metrics
    if not m.latency_seconds:
        return _section("latency", "Update latency", '<p class="note">No update was committed this round.</p>')
    marks = [("p50", m.latency_p50, "-"), ("p90", m.latency_p90, "--"), ("p95", m.latency_p95, ":")]
    silos = sorted(m.latency_seconds, key=lambda s: (m.latency_seconds[s], s))
    values = [m.latency_seconds[s] for s in silos]
    xmax = max(values) * 1.05 or 1
    legend_room = 130
    if len(silos) <= MAX_BAR_SILOS:
        fig, ax = _silo_bars("fig-latency", silos, values, "#54aeff", legend_room, xmax)
    else:  # a histogram: a bar per silo would not be readable
        fig = Figure("fig-latency", WIDTH)
        bins = min(30, len(values) // 2)
        low, width = min(values), (max(values) - min(values)) / bins or 1
        counts = [0] * bins
        for value in values:
            counts[min(bins - 1, int((value - low) / width))] += 1
        ticks = nice_ticks(0, max(counts), 4, integer=True)
        ylim = (0, max(max(counts) * 1.05, ticks[-1]))
        ax = Axes(fig, MARGIN, 10, WIDTH - MARGIN - legend_room, 170, (0, xmax), ylim)
        ax.yaxis(ticks, grid=True, label="silos")
        ax.bars([low + (i + 0.5) * width for i in range(bins)], counts, width, "#54aeff")
        ax.frame()
        fig.height = ax.bottom + 42
    for _, value, dash in marks:
        ax.vline(value, "#1f2328", dash=dash)
    fig.legend(ax.left + ax.width + 12, ax.top + 8,
               [LegendEntry(f"{name} {_seconds(value)}", stroke="#1f2328", dash=dash) for name, value, dash in marks],
               columns=1)
    ax.xaxis(nice_ticks(0, xmax, 6), label="seconds from dispatch to commit")
    summary = (f"<p>p50 <b>{_seconds(m.latency_p50)}</b> · p90 <b>{_seconds(m.latency_p90)}</b> · "
               f"p95 <b>{_seconds(m.latency_p95)}</b> · max <b>{_seconds(m.latency_max)}</b> "
               f"over {len(silos)} committed updates.</p>")
    return _section("latency", "Update latency", summary,
                    _svg(fig, "Seconds from dispatch to commit, per silo, with the percentiles."))


def _drift_section(drift: DriftTable | None, round_id: str) -> str:
    if drift is None:
        return _section("drift", "Drift", '<p class="note" id="no-drift">no drift scores this round</p>')
    parts = []
    if drift.round_id != round_id:
        parts.append(f'<p class="note">Scores from round {_e(drift.round_id)}.</p>')
    parts.append(f"<p>{len(drift.drifted_silos)} of {len(drift.silos)} silos with scores drifted "
                 f"({_percent(drift.drifted_share)}).</p>")
    silos = sorted(drift.silos)
    if any(drift.silos[s].columns for s in silos):
        parts.append(_heat_map(drift, silos))
    lines = []
    for silo in silos:
        report = drift.silos[silo]
        verdict = "<b>data drifted</b>" if report.dataset_drifted else "no dataset drift"
        flagged = sum(c.drifted for c in report.columns.values())
        lines.append(f"<li><b>{_e(silo)}</b>: {flagged} of {len(report.columns)} columns drifted "
                     f"({_percent(report.drifted_share)}), {verdict}; reference {_e(report.reference)}, "
                     f"{report.reference_rows:,} reference rows, {report.current_rows:,} current rows</li>")
    lines += [f"<li><b>{_e(silo)}</b>: no scores ({_e(why)})</li>" for silo, why in sorted(drift.missing.items())]
    parts.append(f'<ul id="drift-silos">{"".join(lines)}</ul>')
    return _section("drift", "Drift", *parts)


def _heat_map(drift: DriftTable, silos: list[str]) -> str:
    columns = list(dict.fromkeys([*drift.columns, *(c for s in silos for c in drift.silos[s].columns)]))
    hidden = 0
    if len(columns) > MAX_DRIFT_COLUMNS:
        flagged = [c for c in columns if any(getattr(drift.silos[s].columns.get(c), "drifted", False) for s in silos)]
        keep = set((flagged + [c for c in columns if c not in set(flagged)])[:MAX_DRIFT_COLUMNS])
        hidden, columns = len(columns) - len(keep), [c for c in columns if c in keep]
    left = max(text_width(_clean(s, LABEL_CHARS)) for s in silos) + 12
    top = max(text_width(_clean(c, LABEL_CHARS)) for c in columns) + 12
    fig = Figure("fig-drift", max(left + CELL * len(columns) + RIGHT, 360))
    ax = Axes(fig, left, top, CELL * len(columns), CELL * len(silos), (0, len(columns)), (0, len(silos)), y_down=True)
    hatch = f"url(#{fig.hatch(DRIFTED_COLOUR, DRIFTED_EDGE)})"
    looks = {"no-score": style(NO_SCORE_COLOUR, "#ffffff", 0.5), "steady": style(STEADY_COLOUR, "#ffffff", 0.5),
             "drifted": style(hatch, DRIFTED_EDGE, 1.2)}
    for i, silo in enumerate(silos):
        for j, column in enumerate(columns):
            cell = drift.silos[silo].columns.get(column)
            # Coloured by the verdict alone: a p-value and a distance point opposite ways, so
            # the raw score has no common scale; it goes in the tooltip with its method.
            if cell is None:
                state, tip = "no-score", "no score"
            else:
                state = "drifted" if cell.drifted else "steady"
                tip = f"{'drifted' if cell.drifted else 'not drifted'}, score {cell.score:.4g} ({_clean(cell.method)})"
            fig.add(f'<g class="drift-cell {state}" data-silo="{_e(silo)}" data-column="{_e(column)}">'
                    f"<title>{_e(silo)} × {_e(column)}: {esc(tip)}</title>"
                    f'<path d="{rect_path(ax.x(j), ax.y(i), CELL, CELL)}" style="{looks[state]}"/></g>')
    ax.yaxis([i + 0.5 for i in range(len(silos))], [_clean(s, LABEL_CHARS) for s in silos])
    ax.xaxis([j + 0.5 for j in range(len(columns))], [_clean(c, LABEL_CHARS) for c in columns], top=True)
    fig.height = ax.bottom + 16 + fig.legend(8, ax.bottom + 16, [
        LegendEntry("drifted", fill=DRIFTED_COLOUR, stroke=DRIFTED_EDGE, width=1.2, hatched=True),
        LegendEntry("not drifted", fill=STEADY_COLOUR), LegendEntry("no score", fill=NO_SCORE_COLOUR)])
    caption = ("Silo × column: hatched, outlined cells drifted by the silo's own test; hover a cell for its score "
               "and method.")
    note = (f'<p class="note">{hidden} more columns are not shown (columns that drifted somewhere come first).</p>'
            if hidden else "")
    return _svg(fig, caption) + note


def _reasons_section(kind: str, heading: str, counts: dict[str, int], empty: str) -> str:
    if not counts:
        return _section(kind, heading, f'<p class="note">{empty}</p>')
    rows = [[reason, n] for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return _section(kind, heading, _table(f"{kind}-table", ["reason", "updates"], rows))
