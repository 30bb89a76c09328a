"""A round's HTML report: one self-contained page (inline SVG plots, inline CSS, no JS,
no fonts, nothing fetched) that reads the same opened from S3 or from an MLflow artifact
view with no network: the round's header, its metrics next to the earlier rounds',
participation, the weight of each silo, the update latency, the drift heat map and why
updates were rejected or declined.

matplotlib is imported inside `render_round_report`, so that importing this module (the
DAG files do, at parse time) costs nothing."""

from __future__ import annotations

import html
import io
import math
import re
import unicodedata
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # history pulls in the object store (boto3); the types alone are enough here
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

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

CANDIDATE_COLOUR, CHAMPION_COLOUR = "#0969da", "#57606a"
DRIFTED_COLOUR, DRIFTED_EDGE, STEADY_COLOUR, NO_SCORE_COLOUR = "#f4a582", "#b2182b", "#d1e5f0", "#eeeeee"


def render_round_report(history: Sequence[RoundRecord], current: RoundRecord, drift: DriftTable | None) -> str:
    """The round's report page. `history`: the federation's earlier rounds, oldest first
    (a record of `current` in it is replaced by `current`); `drift`: the round's drift
    table, None when no silo was asked for scores."""
    import matplotlib

    rounds, total = _rounds(history, current)
    # The SVG keeps text as <text> (the viewer's own sans-serif, no embedded glyph paths:
    # smaller and searchable); silo ids and column names with '$' must not turn into mathtext.
    style = {"svg.fonttype": "none", "text.parse_math": False, "font.family": "sans-serif", "font.size": 8,
             "axes.titlesize": 9, "axes.spines.top": False, "axes.spines.right": False, "svg.id": None,
             "hatch.linewidth": 0.8, "legend.fontsize": 7, "legend.frameon": False}
    with matplotlib.rc_context(style):
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

def _figure(width: float, height: float) -> Figure:
    # A bare Figure on the Agg canvas: no pyplot, so no global figure registry and no GUI
    # backend on a headless worker, and nothing to close afterwards.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


_AUTO_ID = re.compile(r"[A-Za-z][\w.]*_\d+")  # matplotlib's group counters: figure_1, axes_1, patch_3, ...
_FLOAT = re.compile(r"-?\d+\.\d+")
_GEOMETRY = {"d", "x", "y", "width", "height", "transform"}
_NO_ROTATION = re.compile(r"^rotate\(-?0 [^)]*\)$")
_INHERITED = re.compile(r"(?:(?:fill|stroke|font)[\w-]*:[^;]*;?)+")  # what children inherit from a <g>
_NS = {"svg": "{http://www.w3.org/2000/svg}", "xlink": "{http://www.w3.org/1999/xlink}"}


def _svg(fig: Figure, figure_id: str, caption: str, cells: dict[str, dict[str, str]] | None = None) -> str:
    """The figure as inline SVG inside a <figure id=...>. `cells`: group id -> the attributes
    (and "title", the tooltip) that group gets; matplotlib has no way to say either."""
    import matplotlib

    buf = io.StringIO()
    # Several SVGs share one HTML document: salting per figure keeps the ids they reference
    # (clip paths, markers, hatches) apart, and fixes them, so a re-rendered report is identical.
    with matplotlib.rc_context({"svg.hashsalt": figure_id}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    root = _compact(ET.fromstring(buf.getvalue()), cells or {})
    return (f'<figure id="{figure_id}"><figcaption class="note">{caption}</figcaption>\n'
            f"{ET.tostring(root, encoding='unicode').replace(' />', '/>')}</figure>")  # '>' is escaped in values


def _compact(root: ET.Element, cells: dict[str, dict[str, str]]) -> ET.Element:
    """matplotlib's SVG, about a third the size and fit to sit inside HTML: no namespace
    prefixes (HTML's parser puts <svg> in its namespace, and SVG 2 takes plain href), no
    metadata or per-text font lists (the page's CSS sets the font), no counter ids (they
    would repeat across figures), no attribute-less groups, a style its children share set
    once on their group, coordinates to 0.1 pt."""
    def clean(element: ET.Element) -> list[ET.Element]:
        element.tag = element.tag.rpartition("}")[2]
        for key in list(element.attrib):
            value = element.attrib.pop(key)
            key = "href" if key == _NS["xlink"] + "href" else key
            if key == "id" and _AUTO_ID.fullmatch(value):
                continue
            if key in _GEOMETRY:
                value = _FLOAT.sub(lambda m: f"{float(m[0]):.1f}".removesuffix(".0"), " ".join(value.split()))
                value = re.sub(r" ?([MLCQz]) ?", r"\1", value) if key == "d" else _NO_ROTATION.sub("", value)
            elif key == "style":
                value = re.sub(r"\s*([:;])\s*", r"\1", re.sub(r"font-family:[^;]*;?", "", value)).strip(";")
            if value:
                element.set(key, value)
        extra = cells.get(element.get("id", ""))
        if extra:
            del element.attrib["id"]  # only the hook for this; class and data-* name the cell
            element.attrib.update({k: v for k, v in extra.items() if k != "title"})
            title = ET.Element("title")
            title.text = extra["title"]
            element.insert(0, title)
        children = []
        for child in list(element):
            if child.tag in (_NS["svg"] + "metadata", _NS["svg"] + "style") or (
                    child.tag == _NS["svg"] + "defs" and all(c.tag == _NS["svg"] + "style" for c in child)):
                continue  # the default style is in _CSS
            children.extend(clean(child))
        element[:] = children
        styles = {c.get("style") for c in children}
        if (element.tag == "g" and "style" not in element.attrib and len(styles) == 1 and None not in styles
                and _INHERITED.fullmatch(next(iter(styles)))):  # e.g. a line's markers
            element.set("style", styles.pop())
            for child in children:
                del child.attrib["style"]
        if children and element.text is not None and not element.text.strip():
            element.text = None
        element.tail = "\n" if element.tail is not None else None  # the indentation is a fifth of the bytes
        if element.tag == "g" and not element.attrib:
            return children  # a group that sets nothing: its children go to its parent
        return [element]

    (root,) = clean(root)
    root.set("xmlns", _NS["svg"][1:-1])
    return root


def _round_axis(ax: Axes, rounds: Sequence[RoundRecord], labels: bool = True, most: int = 25) -> None:
    """Rounds along x, this round shaded; no tick marks (the labels place the rounds and
    every mark costs bytes in the SVG)."""
    positions = list(range(len(rounds)))
    step = max(1, math.ceil(len(rounds) / most))
    tilt = len(rounds) > 8
    if labels:
        ax.set_xticks(positions[::step], [_clean(r.round_id, 12) for r in rounds][::step],
                      rotation=45 if tilt else 0, ha="right" if tilt else "center", rotation_mode="anchor")
    else:
        ax.set_xticks(positions[::step])
    ax.tick_params(axis="x", bottom=False, labelbottom=labels)
    ax.set_xlim(-0.6, len(rounds) - 0.4)
    ax.axvspan(len(rounds) - 1.45, len(rounds) - 0.55, color="#fff3c4", zorder=0, lw=0)


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
    from matplotlib.lines import Line2D

    current, primary = rounds[-1].metrics, _primary_metric(rounds)
    names = sorted({k for r in rounds for k in (*r.metrics.candidate, *r.metrics.champion)})
    if not names:
        return _section("metrics-by-round", "Metrics by round",
                        '<p class="note">No round has candidate or champion metrics yet.</p>')
    others = [n for n in names if n != primary]
    dropped = others[MAX_OTHER_METRICS:]
    panels = ([primary] if primary in names else []) + others[:MAX_OTHER_METRICS]
    emphasised = primary in names
    top = 1 if emphasised else 0  # the primary metric's panel spans the first row
    small_rows = math.ceil((len(panels) - top) / 2)
    fig = _figure(8, 2.6 * top + 1.9 * small_rows + 0.4)
    grid = fig.add_gridspec(top + small_rows, 2, height_ratios=[1.5] * top + [1] * small_rows)
    xs = range(len(rounds))
    seen: set[str] = set()
    for i, name in enumerate(panels):
        main = emphasised and i == 0
        k = i - top
        ax = fig.add_subplot(grid[0, :] if main else grid[top + k // 2, k % 2])
        champion = [r.metrics.champion.get(name, math.nan) for r in rounds]
        candidate = [r.metrics.candidate.get(name, math.nan) for r in rounds]
        ax.plot(xs, champion, color=CHAMPION_COLOUR, ls="--", lw=1.6 if main else 1)
        ax.plot(xs, candidate, color=CANDIDATE_COLOUR, lw=2.2 if main else 1.2, zorder=2)
        for decision in dict.fromkeys(r.decision for r in rounds):  # a set would reorder by hash seed
            seen.add(decision)
            _decision_markers(ax, [(x, v) for x, r, v in zip(xs, rounds, candidate) if r.decision == decision],
                              decision, 7 if main else 5)
        ax.set_title(f"{_clean(name, 40)} (primary)" if main else _clean(name, 40),
                     fontweight="bold" if main else "normal", loc="left")
        _round_axis(ax, rounds, most=25 if main else 10)
        ax.grid(axis="y", color="#eaeef2", lw=0.6)
    handles = [Line2D([], [], color=CANDIDATE_COLOUR, lw=2, label="candidate"),
               Line2D([], [], color=CHAMPION_COLOUR, lw=1, ls="--", label="champion")]
    for decision, (label, colour) in DECISIONS.items():
        if decision in seen:
            handles.append(Line2D([], [], ls="", label=label, **_marker_style(decision, colour, 6)))
    fig.legend(handles=handles, loc="outside upper center", ncol=len(handles))
    caption = ("Candidate (solid) and champion (dashed) by round; markers give each round's decision "
               "(filled: promoted, hollow: rolled back; ✕ at the bottom: no candidate). The shaded round is this one.")
    parts = [_svg(fig, "fig-metrics-by-round", caption)]
    if dropped:
        parts.append(f'<p class="note">Not plotted: {_e(", ".join(dropped))}.</p>')
    this_round = sorted(set(current.candidate) | set(current.champion), key=lambda n: (n != primary, n))
    if this_round:
        parts.append(_table("metrics-this-round", ["metric (this round)", "candidate", "champion"],
                            [[f"{n} (primary)" if n == primary else n, current.candidate.get(n),
                              current.champion.get(n)] for n in this_round]))
    return _section("metrics-by-round", "Metrics by round", *parts)


def _marker_style(decision: str, colour: str, size: float) -> dict[str, Any]:
    # Filled or hollow as well as coloured, so the decision reads without colour too.
    if decision == "promoted":
        return {"marker": "o", "ms": size, "mfc": colour, "mec": colour}
    if decision == "rejected":
        return {"marker": "o", "ms": size, "mfc": "white", "mec": colour, "mew": 1.5}
    if decision == "refused":
        return {"marker": "s", "ms": size, "mfc": "white", "mec": colour, "mew": 1.5}
    return {"marker": "x", "ms": size, "mec": colour, "mew": 1.5}


def _decision_markers(ax: Axes, points: list[tuple[int, float]], decision: str, size: float) -> None:
    """One decision's rounds on a metric panel, in one artist (one marker definition in the SVG)."""
    colour = DECISIONS.get(decision, (decision, "#57606a"))[1]
    placed = [(x, v) for x, v in points if math.isfinite(v)]
    if placed:
        ax.plot(*zip(*placed), ls="", zorder=3, **_marker_style(decision, colour, size))
    floor = [x for x, v in points if not math.isfinite(v)]
    if floor:  # no candidate to place: mark the round on the floor of the panel
        ax.plot(floor, [0.03] * len(floor), ls="", transform=ax.get_xaxis_transform(), clip_on=False, zorder=3,
                **_marker_style("no_model" if decision == "promoted" else decision, colour, size))


def _participation_section(rounds: Sequence[RoundRecord]) -> str:
    fig = _figure(8, 3.6)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[1, 1.2])
    xs = list(range(len(rounds)))
    top.plot(xs, [100 * r.metrics.participation_rate for r in rounds], color=CANDIDATE_COLOUR, marker="o", ms=3)
    top.set_ylim(0, 105)
    top.set_ylabel("participation %")
    top.grid(axis="y", color="#eaeef2", lw=0.6)
    # Nested bars: expected contains committed contains accepted.
    bottom.bar(xs, [r.metrics.clients_expected for r in rounds], width=0.8, color="#eaeef2", label="expected")
    bottom.bar(xs, [r.metrics.clients_committed for r in rounds], width=0.55, color="#54aeff", label="committed")
    bottom.bar(xs, [r.metrics.clients_accepted for r in rounds], width=0.3, color="#1a7f37", label="accepted")
    bottom.set_ylabel("silos")
    bottom.yaxis.get_major_locator().set_params(integer=True)
    bottom.legend(loc="upper left", ncol=3, bbox_to_anchor=(0, 1.15))
    _round_axis(top, rounds, labels=False)
    _round_axis(bottom, rounds)
    m = rounds[-1].metrics
    text = (f"<p>This round: <b>{_percent(m.participation_rate)}</b> participation, {m.clients_committed} of "
            f"{m.clients_expected} silos committed, {m.clients_accepted} accepted.</p>")
    return _section("participation", "Participation by round", text,
                    _svg(fig, "fig-participation", "Share of the expected silos that committed, and silo counts, "
                                                   "by round."))


def _weights_section(current: RoundRecord) -> str:
    m = current.metrics
    if not m.weights:
        why = ("no update was accepted" if m.clients_accepted == 0 else
               "the aggregation rule gives no per-silo weights (e.g. median or trimmed mean: "
               "every accepted update counts alike)")
        return _section("weights", "Weight per silo", f'<p class="note" id="no-weights">No weights this round: {why}.</p>')
    silos = sorted(m.weights, key=lambda s: (-m.weights[s], s))
    fig = _figure(7, 0.8 + 0.22 * len(silos))
    ax = fig.add_subplot()
    ys = range(len(silos))
    ax.barh(ys, [m.weights[s] for s in silos], color=CANDIDATE_COLOUR, height=0.65)
    ax.set_yticks(list(ys), [_clean(s, LABEL_CHARS) for s in silos])
    ax.invert_yaxis()
    for y, silo in zip(ys, silos):
        ax.annotate(f"{m.weights[silo]:.3f}", (m.weights[silo], y), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=7)
    ax.axvline(1 / len(silos), color=CHAMPION_COLOUR, ls=":", lw=1)
    ax.set_xlabel("share of the candidate (dotted: equal shares)")
    ax.set_xlim(0, max(m.weights.values()) * 1.15 or 1)
    table = _table("weights-table", ["silo", "weight"], [[s, m.weights[s]] for s in silos])
    return _section("weights", "Weight per silo", _svg(fig, "fig-weights", "Each accepted silo's share of the "
                                                                            "candidate this round."), table)


def _latency_section(current: RoundRecord) -> str:
    m = current.metrics
    if not m.latency_seconds:
        return _section("latency", "Update latency", '<p class="note">No update was committed this round.</p>')
    marks = [("p50", m.latency_p50, "-"), ("p90", m.latency_p90, "--"), ("p95", m.latency_p95, ":")]
    silos = sorted(m.latency_seconds, key=lambda s: (m.latency_seconds[s], s))
    values = [m.latency_seconds[s] for s in silos]
    if len(silos) <= MAX_BAR_SILOS:
        fig = _figure(7, 0.9 + 0.22 * len(silos))
        ax = fig.add_subplot()
        ax.barh(range(len(silos)), values, color="#54aeff", height=0.65)
        ax.set_yticks(range(len(silos)), [_clean(s, LABEL_CHARS) for s in silos])
        ax.invert_yaxis()
    else:
        fig = _figure(7, 2.6)
        ax = fig.add_subplot()
        ax.hist(values, bins=min(30, len(values) // 2), color="#54aeff")
        ax.set_ylabel("silos")
    for name, value, ls in marks:
        ax.axvline(value, color="#1f2328", ls=ls, lw=1, label=f"{name} {_seconds(value)}")
    ax.set_xlabel("seconds from dispatch to commit")
    ax.set_xlim(0, None)
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1))  # beside the bars, not over them
    summary = (f"<p>p50 <b>{_seconds(m.latency_p50)}</b> · p90 <b>{_seconds(m.latency_p90)}</b> · "
               f"p95 <b>{_seconds(m.latency_p95)}</b> · max <b>{_seconds(m.latency_max)}</b> "
               f"over {len(silos)} committed updates.</p>")
    return _section("latency", "Update latency", summary,
                    _svg(fig, "fig-latency", "Seconds from dispatch to commit, per silo, with the percentiles."))


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
    from matplotlib.patches import Patch, Rectangle

    columns = list(dict.fromkeys([*drift.columns, *(c for s in silos for c in drift.silos[s].columns)]))
    hidden = 0
    if len(columns) > MAX_DRIFT_COLUMNS:
        flagged = [c for c in columns if any(getattr(drift.silos[s].columns.get(c), "drifted", False) for s in silos)]
        keep = set((flagged + [c for c in columns if c not in set(flagged)])[:MAX_DRIFT_COLUMNS])
        hidden, columns = len(columns) - len(keep), [c for c in columns if c in keep]
    label_room = 0.055 * max(len(_clean(c, LABEL_CHARS)) for c in columns)
    fig = _figure(min(16.0, 1.8 + 0.2 * len(columns)), 0.9 + 0.22 * len(silos) + label_room)
    ax = fig.add_subplot()
    cells: dict[str, dict[str, str]] = {}  # gid -> the attributes and tooltip its <g> gets in the SVG
    for i, silo in enumerate(silos):
        for j, column in enumerate(columns):
            cell = drift.silos[silo].columns.get(column)
            gid = f"drift-cell-{i}-{j}"
            # Colour by the verdict alone: a p-value and a distance point opposite ways, so the
            # raw score has no common scale; it goes in the tooltip with its method.
            if cell is None:
                ax.add_patch(Rectangle((j, i), 1, 1, fc=NO_SCORE_COLOUR, ec="white", lw=0.5, gid=gid, clip_on=False))
                state, tip = "no-score", "no score"
            elif cell.drifted:
                ax.add_patch(Rectangle((j, i), 1, 1, fc=DRIFTED_COLOUR, ec=DRIFTED_EDGE, lw=1.2, hatch="///",
                                       gid=gid, clip_on=False))
                state, tip = "drifted", f"drifted, score {cell.score:.4g} ({_clean(cell.method)})"
            else:
                ax.add_patch(Rectangle((j, i), 1, 1, fc=STEADY_COLOUR, ec="white", lw=0.5, gid=gid, clip_on=False))
                state, tip = "steady", f"not drifted, score {cell.score:.4g} ({_clean(cell.method)})"
            # ElementTree escapes these when it writes the SVG.
            cells[gid] = {"class": f"drift-cell {state}", "data-silo": _clean(silo), "data-column": _clean(column),
                          "title": f"{_clean(silo)} × {_clean(column)}: {tip}"}
    ax.set_xlim(0, len(columns))
    ax.set_ylim(len(silos), 0)
    ax.set_xticks([j + 0.5 for j in range(len(columns))], [_clean(c, LABEL_CHARS) for c in columns], rotation=90)
    ax.set_yticks([i + 0.5 for i in range(len(silos))], [_clean(s, LABEL_CHARS) for s in silos])
    ax.tick_params(length=0)
    for side in ("left", "bottom"):
        ax.spines[side].set_visible(False)
    ax.xaxis.tick_top()
    fig.legend(handles=[Patch(fc=DRIFTED_COLOUR, ec=DRIFTED_EDGE, hatch="///", label="drifted"),
                        Patch(fc=STEADY_COLOUR, label="not drifted"), Patch(fc=NO_SCORE_COLOUR, label="no score")],
               loc="outside lower left", ncol=3)

    caption = ("Silo × column: hatched, outlined cells drifted by the silo's own test; hover a cell for its score "
               "and method.")
    note = (f'<p class="note">{hidden} more columns are not shown (columns that drifted somewhere come first).</p>'
            if hidden else "")
    return _svg(fig, "fig-drift", caption, cells) + note


def _reasons_section(kind: str, heading: str, counts: dict[str, int], empty: str) -> str:
    if not counts:
        return _section(kind, heading, f'<p class="note">{empty}</p>')
    rows = [[reason, n] for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return _section(kind, heading, _table(f"{kind}-table", ["reason", "updates"], rows))
