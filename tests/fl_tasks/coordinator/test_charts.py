"""fl_tasks/coordinator/charts.py: the round's HTML report. The page is parsed (html.parser
for the sections, xml.etree for each inline SVG) and checked against the figures the
records hold; nothing is compared with a stored snapshot."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fl_tasks.coordinator.charts import DECISIONS, MAX_ROUNDS_SHOWN, render_round_report
from fl_tasks.coordinator.drift import DriftTable
from fl_tasks.coordinator.history import RoundRecord
from fl_tasks.coordinator.metrics import RoundMetrics
from fl_tasks.protocol.drift import ColumnDrift, DriftReport

SVG = "{http://www.w3.org/2000/svg}"
HOSTILE_SILO = "<script>alert('silo')</script>"
HOSTILE_REASON = "<script>alert('reason')</script> norm 9.1 over 3x median"
HOSTILE_COLUMN = 'amount"><img src=x onerror=alert(1)>'
SECTIONS = ("header", "metrics-by-round", "participation", "weights", "latency", "drift", "rejected", "declined")


# -- builders -----------------------------------------------------------------------------

def metrics(round_id: str, silos: list[str], *, committed: int | None = None, accepted: int | None = None,
            weighted: bool = True, candidate: dict | None = None, champion: dict | None = None,
            **extra) -> RoundMetrics:
    committed = len(silos) if committed is None else committed
    accepted = committed if accepted is None else accepted
    n = int(round_id)
    latency = {s: 30.0 + 17.5 * i + n for i, s in enumerate(silos[:committed])}
    raw = {s: 100.0 * (i + 1) for i, s in enumerate(silos[:accepted])}
    weights = {s: w / sum(raw.values()) for s, w in raw.items()} if weighted else {}
    return RoundMetrics(
        federation="fraud-eu", round_id=round_id, clients_expected=len(silos), clients_committed=committed,
        clients_accepted=accepted, participation_rate=committed / len(silos), latency_seconds=latency,
        bytes_down=4_200_000 * len(silos), bytes_up=4_100_000 * committed, weights=weights,
        primary_metric="roc_auc",
        candidate={"roc_auc": 0.80 + n / 200, "pr_auc": 0.30 + n / 300, "log_loss": 0.5 - n / 100}
        if candidate is None else candidate,
        champion={"roc_auc": 0.80 + n / 210, "pr_auc": 0.30 + n / 320, "log_loss": 0.5 - n / 110}
        if champion is None else champion, **extra)


def record(round_id: str, decision: str, m: RoundMetrics, **extra) -> RoundRecord:
    base = dict(round_id=round_id, run_id=f"scheduled__{round_id}", dag_id="fl_round_fraud-eu",
                run_type="scheduled", triggered_by="scheduler", decision=decision,
                version=str(int(round_id)) if decision == "promoted" else None, base_version="1",
                reason="all gates passed" if decision == "promoted" else "roc_auc drop vs champion 0.03 > 0.02",
                finished_at=f"2025-03-{int(round_id) % 28 + 1:02d}T10:00:00+00:00", metrics=m,
                mlflow={"model_name": "fraud-eu", "version": "7", "run_id": "abc123", "experiment_id": "4"})
    base.update(extra)
    return RoundRecord(**base)


def drift_table(round_id: str, silos: list[str], columns: list[str], drifted: set[tuple[str, str]],
                missing: dict[str, str] | None = None) -> DriftTable:
    """p-value tests on even columns and distances on odd ones, so a score alone says nothing
    about the verdict; `drifted` gives it."""
    reports = {}
    for s in silos:
        cells = {}
        for j, c in enumerate(columns):
            hit = (s, c) in drifted
            if j % 2 == 0:
                cells[c] = ColumnDrift(0.0012 + j / 1e4 if hit else 0.41 + j / 1e3, hit, "ks")
            else:
                cells[c] = ColumnDrift(0.37 + j / 1e3 if hit else 0.021 + j / 1e4, hit, "wasserstein")
        share = sum(c.drifted for c in cells.values()) / len(cells)
        reports[s] = DriftReport(f"first window (round 000001) of {s}", 12_000, 3_100, share, share >= 0.5, cells)
    return DriftTable(round_id, tuple(columns), reports, missing or {})


SILOS = ["bank-north", "bank-south", HOSTILE_SILO, "credit-union", "$ mutual $ bank"]
CONTROL_COLUMN = "terminal\x00id\x1b[31m"  # characters XML cannot hold: shown as '?'
SHOWN_COLUMN = {"terminal?id?[31m": CONTROL_COLUMN}
COLUMNS = ["amount", "merchant_category", HOSTILE_COLUMN, "hour", "$country", "device_age_days", CONTROL_COLUMN]
DRIFTED = {("bank-north", "amount"), ("bank-north", HOSTILE_COLUMN), ("bank-north", "hour"),
           ("bank-north", "$country"), (HOSTILE_SILO, "amount"), ("credit-union", "device_age_days")}


def federation() -> tuple[list[RoundRecord], RoundRecord, DriftTable]:
    """Five rounds: promoted, rolled back, no model, a median round (no weights), and the
    current one, in which the hostile silo's update was rejected."""
    history = [
        record("000001", "promoted", metrics("000001", SILOS)),
        record("000002", "rejected", metrics("000002", SILOS, committed=4)),
        record("000003", "no_model", metrics("000003", SILOS, committed=1, candidate={}),
               reason="quorum not reached: 1 of 5 committed"),
        record("000004", "promoted", metrics("000004", SILOS, weighted=False), triggered_by="monitoring: drift"),
    ]
    current = record("000005", "promoted", metrics(
        "000005", SILOS, accepted=4, rejected_by_reason={HOSTILE_REASON: 1, "stale base version": 2},
        declined_by_reason={"<b>maintenance</b> window": 1}, drifted_share=0.25),
        triggered_by="alice <alice@bank.example>")
    return history, current, drift_table("000005", SILOS[:4], COLUMNS, DRIFTED, {SILOS[4]: "evidently failed: <oops>"})


# -- reading the page ---------------------------------------------------------------------

class Page(HTMLParser):
    """Element ids and the text under each section."""

    def __init__(self, text: str):
        super().__init__()
        self.ids: dict[str, str] = {}
        self.text: dict[str, str] = {}
        self.tags: list[str] = []
        self._open: list[tuple[str, str | None]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        element_id = dict(attrs).get("id")
        if element_id:
            assert element_id not in self.ids, f"duplicate id {element_id}"
            self.ids[element_id] = tag
        if tag in ("section", "header"):
            self._open.append((tag, element_id))

    def handle_endtag(self, tag):
        if self._open and self._open[-1][0] == tag:
            self._open.pop()

    def handle_data(self, data):
        for _, section in self._open:
            self.text[section] = self.text.get(section, "") + data


def svg_of(page: str, figure_id: str) -> ET.Element:
    match = re.search(rf'<figure id="{figure_id}">.*?(<svg\b.*?</svg>)\s*</figure>', page, re.S)
    assert match, f"no SVG in figure {figure_id}"
    return ET.fromstring(match[1])  # well-formed XML, so data reached it escaped


def svg_text(svg: ET.Element) -> str:
    return " ".join("".join(t.itertext()) for t in svg.iter(f"{SVG}text"))


@pytest.fixture(scope="module")
def rendered() -> tuple[str, list[RoundRecord], RoundRecord, DriftTable]:
    history, current, drift = federation()
    return render_round_report(history, current, drift), history, current, drift


# -- tests --------------------------------------------------------------------------------

def test_every_section_and_figure_is_present_and_drawn(rendered):
    page = Page(rendered[0])
    assert set(SECTIONS) <= set(page.ids)
    for figure_id in ("fig-metrics-by-round", "fig-participation", "fig-weights", "fig-latency", "fig-drift"):
        assert page.ids.get(figure_id) == "figure"
        svg = svg_of(rendered[0], figure_id)
        assert len(list(svg.iter(f"{SVG}path"))) > 3 and svg_text(svg).strip()
    for section in SECTIONS:
        assert page.text.get(section, "").strip(), section


def test_header_names_the_round_decision_and_who_started_it(rendered):
    page, current = Page(rendered[0]), rendered[2]
    header = page.text["header"]
    assert "fraud-eu" in header and "round 000005" in header and "promoted" in header
    assert "alice <alice@bank.example>" in header  # decoded text: it was escaped, not dropped
    assert "version 7" in header and "abc123" in header and current.reason in header


def test_page_is_self_contained():
    history, current, drift = federation()
    page = render_round_report(history, current, drift)
    assert "<script" not in page.lower() and "<link" not in page.lower() and "@import" not in page
    assert not re.findall(r'\b(?:src|href)\s*=\s*"(?!#)', page)  # only in-page references (SVG defs)
    assert not re.findall(r"url\((?!#)", page)
    assert "<?xml" not in page and "<!DOCTYPE svg" not in page


def test_hostile_strings_are_escaped(rendered):
    page = rendered[0]
    assert "<script" not in page and "<img" not in page and "<b>maintenance" not in page and "<oops>" not in page
    text = " ".join(Page(page).text.values())
    for hostile in (HOSTILE_REASON, "<b>maintenance</b> window", "evidently failed: <oops>", HOSTILE_SILO):
        assert hostile in text  # shown to the reader as text
    assert "&lt;script&gt;" in page
    # The silo id also reached the plots' labels, escaped, and the tooltips.
    assert HOSTILE_SILO[:20] in svg_text(svg_of(page, "fig-latency"))  # cut to fit the axis
    assert "$ mutual $ bank" in svg_text(svg_of(page, "fig-latency"))  # not taken for mathtext


def test_figures_carry_the_numbers_of_the_records(rendered):
    page, _, current, _ = rendered
    m, sections = current.metrics, Page(page).text
    p95 = f"{m.latency_p95:.1f} s"
    assert f"p95 {p95}" in sections["latency"] and f"p95 {p95}" in svg_text(svg_of(page, "fig-latency"))
    assert f"p50 {m.latency_p50:.1f} s" in svg_text(svg_of(page, "fig-latency"))
    assert f"max {m.latency_max:.1f} s" in sections["latency"]
    weights_text = svg_text(svg_of(page, "fig-weights"))
    for silo, weight in m.weights.items():
        assert f"{weight:.3f}" in weights_text and f"{weight:.4g}" in sections["weights"], silo
    assert f"{100 * m.participation_rate:.0f}%" in sections["participation"]
    assert f"{m.candidate['roc_auc']:.4g}" in sections["metrics-by-round"]
    assert f"{m.champion['pr_auc']:.4g}" in sections["metrics-by-round"]
    assert "roc_auc (primary)" in svg_text(svg_of(page, "fig-metrics-by-round"))
    assert "stale base version" in sections["rejected"] and "2" in sections["rejected"]


def test_every_round_is_on_the_axis_and_decisions_are_in_the_legend(rendered):
    page, history, current, _ = rendered
    for figure_id in ("fig-metrics-by-round", "fig-participation"):
        text = svg_text(svg_of(page, figure_id))
        for entry in [*history, current]:
            assert entry.round_id in text
    legend = svg_text(svg_of(page, "fig-metrics-by-round"))
    assert "promoted" in legend and "rolled back" in legend and "no model" in legend and "refused" not in legend


def test_each_rounds_decision_is_marked_filled_or_hollow(rendered):
    """Per panel, one marker per round in the decision's colour: filled for promoted, hollow
    for rolled back; plus one in the legend."""
    page, history, current, _ = rendered
    svg = svg_of(page, "fig-metrics-by-round")
    parents = {child: parent for parent in svg.iter() for child in parent}

    def style(element: ET.Element) -> dict[str, str]:
        chain = [element]
        while chain[-1] in parents:
            chain.append(parents[chain[-1]])
        merged: dict[str, str] = {}
        for e in reversed(chain):  # the nearest declaration wins, as inheritance does
            merged.update(kv.split(":", 1) for kv in (e.get("style") or "").split(";") if ":" in kv)
        return {k.strip(): v.strip() for k, v in merged.items()}

    markers = [style(u) for u in svg.iter(f"{SVG}use")]
    panels = 3  # roc_auc, pr_auc, log_loss
    decisions = [r.decision for r in [*history, current]]
    green, red = DECISIONS["promoted"][1], DECISIONS["rejected"][1]
    filled_green = [m for m in markers if m.get("stroke") == green and m.get("fill") == green]
    hollow_red = [m for m in markers if m.get("stroke") == red and m.get("fill") == "#ffffff"]
    assert len(filled_green) == decisions.count("promoted") * panels + 1
    assert len(hollow_red) == decisions.count("rejected") * panels + 1
    assert not [m for m in markers if m.get("stroke") == red and m.get("fill") == red]


def test_drifted_cells_are_marked_for_exactly_the_drifted_pairs(rendered):
    page, _, _, drift = rendered
    svg = svg_of(page, "fig-drift")
    cells = [g for g in svg.iter(f"{SVG}g") if "drift-cell" in g.get("class", "").split()]
    assert len(cells) == len(drift.silos) * len(COLUMNS)
    marked, hatched = set(), set()
    for g in cells:
        pair = (g.get("data-silo"), SHOWN_COLUMN.get(g.get("data-column"), g.get("data-column")))
        cell = drift.silos[pair[0]].columns[pair[1]]
        title = g.find(f"{SVG}title").text
        assert f"{cell.score:.4g}" in title and cell.method in title and g.get("data-column") in title
        if "drifted" in g.get("class").split():
            marked.add(pair)
        # The visual mark: a hatch pattern fill, so the cell reads as drifted without colour too.
        if any("url(#h" in (p.get("style") or "") for p in g.iter(f"{SVG}path")):
            hatched.add(pair)
    assert marked == DRIFTED and hatched == DRIFTED
    lines = Page(page).text["drift"]
    assert "first window (round 000001) of bank-north" in lines and "4 of 7 columns drifted (57%)" in lines
    assert "no scores (evidently failed: <oops>)" in lines and "1 of 4 silos with scores drifted (25%)" in lines


def test_a_median_round_says_there_are_no_weights():
    history, _, drift = federation()
    current = record("000006", "promoted", metrics("000006", SILOS, weighted=False))
    page = render_round_report(history, current, drift)
    ids = Page(page).ids
    assert "no-weights" in ids and "fig-weights" not in ids
    assert "median" in Page(page).text["weights"]
    assert "Scores from round 000005" in Page(page).text["drift"]  # an older round's table says so


def test_first_round_with_no_drift_scores():
    current = record("000001", "promoted", metrics("000001", SILOS[:2]))
    page = render_round_report([], current, None)
    parsed = Page(page)
    assert {"fig-metrics-by-round", "fig-participation", "fig-weights", "fig-latency"} <= set(parsed.ids)
    assert "fig-drift" not in parsed.ids and "no drift scores this round" in parsed.text["drift"]
    assert "No update was rejected" in parsed.text["rejected"]
    svg_of(page, "fig-metrics-by-round")


def test_no_model_round_renders():
    history, _, _ = federation()
    m = RoundMetrics("fraud-eu", "000006", clients_expected=5, clients_committed=0, clients_accepted=0,
                     participation_rate=0.0, declined_by_reason={"no data in window": 5})
    current = record("000006", "no_model", m, reason="quorum not reached: 0 of 5 committed", mlflow={})
    parsed = Page(render_round_report(history, current, None))
    assert "no model" in parsed.text["header"] and "not recorded" in parsed.text["header"]
    assert "No update was committed" in parsed.text["latency"] and "fig-latency" not in parsed.ids
    assert "no update was accepted" in parsed.text["weights"]
    assert "no data in window" in parsed.text["declined"]
    assert "fig-metrics-by-round" in parsed.ids  # earlier rounds still have metrics


def test_a_round_in_history_is_replaced_by_the_current_record():
    history, current, drift = federation()
    stale = record("000005", "rejected", metrics("000005", SILOS, candidate={"roc_auc": 0.123456}))
    page = render_round_report([*history, stale], current, drift)
    assert "0.1235" not in page and "0.123456" not in page
    text = svg_text(svg_of(page, "fig-participation"))
    assert text.count("000005") == 1


def test_long_histories_show_the_latest_rounds():
    silos = SILOS[:2]
    history = [record(f"{n:06d}", "promoted", metrics(f"{n:06d}", silos)) for n in range(1, MAX_ROUNDS_SHOWN + 11)]
    current = record(f"{MAX_ROUNDS_SHOWN + 11:06d}", "promoted", metrics(f"{MAX_ROUNDS_SHOWN + 11:06d}", silos))
    page = render_round_report(history, current, None)
    assert f"the last {MAX_ROUNDS_SHOWN} of {MAX_ROUNDS_SHOWN + 11} rounds" in Page(page).text["header"]


def test_twenty_rounds_thirty_columns_stay_small():
    silos = [f"silo-{i}" for i in range(5)]
    columns = [f"feature_{j:02d}" for j in range(30)]
    history = [record(f"{n:06d}", "promoted" if n % 3 else "rejected", metrics(f"{n:06d}", silos))
               for n in range(1, 20)]
    current = record("000020", "promoted", metrics("000020", silos))
    drifted = {(s, c) for i, s in enumerate(silos) for j, c in enumerate(columns) if (i + j) % 7 == 0}
    started = time.perf_counter()
    page = render_round_report(history, current, drift_table("000020", silos, columns, drifted))
    elapsed = time.perf_counter() - started
    assert len(page.encode()) < 200_000, len(page.encode())
    assert elapsed < 30  # generous: a slow CI core; locally well under a few seconds


def test_rendering_imports_no_plotting_library():
    """The summary step pays for what the report imports in every round."""
    code = ("import sys; sys.path.insert(0, 'tests/fl_tasks/coordinator'); import test_charts as t; "
            "t.render_round_report(*t.federation()); print('matplotlib' in sys.modules)")
    root = Path(__file__).resolve().parents[3]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "False"
