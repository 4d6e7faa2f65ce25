"""The benchmark report's pure helpers: percentiles, ratios, the markdown table, the aims."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks.report import DEFAULT_PREAMBLE, MARKER, split_preamble
from benchmarks.stats import (
    Goal,
    PathResult,
    WrkRow,
    check_goals,
    disruption,
    median,
    percentile,
    ratio,
    render_table,
    render_wrk_table,
)

BASE = "ssh -R"


def test_percentile_exact_ranks() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]  # unsorted on purpose
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 3.0
    assert percentile(values, 100) == 5.0
    assert percentile(values, 25) == 2.0


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile(list(map(float, range(1, 101))), 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0


def test_percentile_does_not_reorder_its_input() -> None:
    values = [3.0, 1.0, 2.0]
    percentile(values, 50)
    assert values == [3.0, 1.0, 2.0]


@pytest.mark.parametrize("q", [-1.0, 100.5, float("nan")])
def test_percentile_rejects_q_out_of_range(q: float) -> None:
    with pytest.raises(ValueError, match="within"):
        percentile([1.0], q)


def test_percentile_and_median_reject_empty_samples() -> None:
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match="empty"):
        median([])


def test_median_of_rounds() -> None:
    assert median([3.0, 100.0, 1.0]) == 3.0
    assert median([1.0, 2.0]) == 1.5


def test_ratio() -> None:
    assert ratio(50.0, 200.0) == 0.25
    assert ratio(None, 2.0) is None
    assert ratio(2.0, None) is None
    assert ratio(2.0, 0.0) is None
    assert ratio(2.0, -1.0) is None


def rows() -> list[PathResult]:
    return [
        PathResult("direct", 2000.0, 10000.0),
        PathResult(
            "connector",
            300.0,
            4000.0,
            1.0,
            3.0,
            140.0,
            "cloud 60.0 + node 80.0",
            note="proxy + tunnel + node",
        ),
        PathResult(BASE, 200.0, 8000.0, 0.25, 1.5, 92.0, "sshd 52.0 + ssh 40.0"),
    ]


def test_table_has_a_ratio_to_the_baseline_in_every_measured_cell() -> None:
    table = render_table(rows(), BASE).splitlines()
    assert table[0].startswith(
        "| path | throughput MB/s | requests/s (16 conn.) | p50 added ms | p99 added ms |"
    )
    assert table[2] == "| direct | 2,000.0 (×10.00) | 10,000 (×1.25) | — | — | — |"
    assert table[3] == (
        "| connector (proxy + tunnel + node) | 300.0 (×1.50) | 4,000 (×0.50) | +1.000 (×4.00) | +3.000 (×2.00) "
        "| 140.0 (×1.52)<br>cloud 60.0 + node 80.0 |"
    )
    assert table[4] == "| ssh -R | 200.0 | 8,000 | +0.250 | +1.500 | 92.0 (sshd 52.0 + ssh 40.0) |"
    assert len(table) == 5


def test_table_negative_added_latency_has_no_ratio() -> None:
    table = render_table(
        [PathResult("fast", p50_added_ms=-0.1), PathResult(BASE, p50_added_ms=0.2)], BASE
    )
    assert "| fast | — | — | -0.100 | — | — |" in table


def test_table_needs_its_baseline_row() -> None:
    with pytest.raises(KeyError):
        render_table([PathResult("direct", 1.0)], BASE)


def wrk_rows() -> list[WrkRow]:
    return [
        WrkRow("direct", 7000.0, None, "", 0.45, 2.0),
        WrkRow("connector", 1000.0, 270.0, "cloud 120 + node 150", 1.5, 2.9, 0.9, note="proxy + tunnel + node"),
        WrkRow(BASE, 2000.0, 90.0, "sshd 30 + ssh 60", 0.8, 2.5, 0.5),
    ]


def test_goals_against_the_baseline() -> None:
    assert check_goals(rows(), wrk_rows(), project="connector", baseline=BASE) == [
        Goal("request rate at 16 connections (wrk) at least 0.5x ssh -R's", True, "0.50x"),
        Goal("single-stream throughput at least 1x ssh -R's", True, "1.50x"),
        Goal("CPU per request of its hops at most 3x ssh -R's", True, "3.00x"),
        Goal("added p99 latency at moderate load (wrk) under 1 ms", True, "+0.900 ms"),
    ]


def test_goals_just_missed() -> None:
    slow = [PathResult("connector", 199.0, 3999.0), PathResult(BASE, 200.0, 8000.0)]
    wrk_slow = [WrkRow("connector", 999.0, 271.0, p99_added_ms=1.0), WrkRow(BASE, 2000.0, 90.0)]
    goals = check_goals(slow, wrk_slow, project="connector", baseline=BASE)
    assert [g.met for g in goals] == [False, False, False, False]
    assert [g.measured for g in goals] == ["0.50x", "0.99x", "3.01x", "+1.000 ms"]


def test_goals_not_measured_when_the_project_path_is_missing() -> None:
    goals = check_goals([PathResult(BASE, 200.0, 8000.0)], [WrkRow(BASE, 2000.0, 90.0)],
                        project="connector", baseline=BASE)
    assert [(g.met, g.measured) for g in goals] == [(None, "")] * 4


def test_wrk_table_ratios_to_the_baseline() -> None:
    table = render_wrk_table(wrk_rows(), BASE).splitlines()
    assert table[0].startswith("| path | requests/s (wrk, 16 conn.) | CPU µs per request (hops) |")
    assert table[2] == "| direct | 7,000 (×3.50) | — | 0.450 | 2.000 | — |"
    assert table[3] == ("| connector (proxy + tunnel + node) | 1,000 (×0.50) | 270 (×3.00)<br>cloud 120 + node 150 "
                        "| 1.500 | 2.900 | +0.900 |")
    assert table[4] == "| ssh -R | 2,000 | 90<br>sshd 30 + ssh 60 | 0.800 | 2.500 | +0.500 |"


def test_preamble_kept_across_regeneration() -> None:
    hand_written = "# Benchmarks\n\nOur own words.\n"
    assert split_preamble(hand_written + "\n" + MARKER + "\n\nold figures\n") == hand_written
    assert split_preamble("") == DEFAULT_PREAMBLE
    assert split_preamble("a report without the marker") == DEFAULT_PREAMBLE


def test_failover_summary_block_is_inserted_once_and_replaced(tmp_path):
    from benchmarks.failover import BEGIN, END, update_summary

    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\npreamble\n\n<!-- everything below this line is written by run.py -->\n\nresults\n")
    report = "# Failover\n\nSettings: crash x 2.\n\n| drill | p50 |\n|---|---:|\n| crash | 20 ms |\n\n| fact | value |\n|---|---|\n| cores | 2 |\n"
    update_summary(doc, report)
    update_summary(doc, report.replace("20 ms", "30 ms"))
    text = doc.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert "| crash | 30 ms |" in text and "20 ms" not in text and "| fact" not in text
    assert text.index(END) < text.index("<!-- everything below") and text.endswith("results\n")


# --- disruption around a fault (benchmarks/failover.py's cloud drills) ---------------------------

def test_disruption_is_the_longest_gap_between_successes_around_the_fault() -> None:
    # steady successes every 10 ms, a fault at 1.0, nothing succeeds until 1.35, then steady again
    outcomes = [(round(0.5 + i * 0.01, 3), True) for i in range(51)]  # up to 1.0
    outcomes += [(1.2, False), (1.35, True), (1.36, True), (1.37, True)]
    assert disruption(outcomes, 1.0, 1.0) == pytest.approx(0.35)


def test_disruption_counts_from_the_last_success_before_the_fault_and_ignores_later_gaps() -> None:
    outcomes = [(0.90, True), (1.10, True), (1.15, True), (3.0, True)]  # 3.0: long after the window
    assert disruption(outcomes, 1.0, 1.12) == pytest.approx(0.20)  # 0.90 -> 1.10
    # a gap beginning inside the window counts in full, even if it ends after it
    assert disruption(outcomes, 1.0, 1.5) == pytest.approx(1.85)  # 1.15 -> 3.0


def test_disruption_without_any_success_before_the_fault_counts_from_the_fault() -> None:
    assert disruption([(1.4, True), (1.5, True)], 1.0, 1.0) == pytest.approx(0.4)


def test_disruption_is_infinite_when_nothing_succeeds_after_the_window() -> None:
    assert disruption([(0.9, True), (1.1, True), (1.3, False)], 1.0, 1.2) == math.inf
    assert disruption([], 1.0, 1.0) == math.inf


def test_disruption_ignores_order_and_failures() -> None:
    outcomes = [(1.05, True), (0.99, True), (1.02, False), (1.01, True)]
    assert disruption(outcomes, 1.0, 1.0) == pytest.approx(0.02)  # 0.99 -> 1.01
    assert disruption(outcomes, 1.0, 1.02) == pytest.approx(0.04)  # 1.01 -> 1.05


def test_disruption_rejects_a_window_ending_before_it_starts() -> None:
    with pytest.raises(ValueError, match="before it starts"):
        disruption([(1.0, True)], 2.0, 1.0)


def test_cloud_drills_replace_their_own_block_and_keep_the_on_premise_figures(tmp_path: Path) -> None:
    from benchmarks.failover import CLOUD_BEGIN, CLOUD_END, write_cloud

    output, summary = tmp_path / "failover-benchmarks.md", tmp_path / "benchmarks.md"
    output.write_text("# Failover benchmark\n\n| crash | 20 |\n")
    summary.write_text(f"# Benchmarks\n\nintro\n\n{MARKER}\n\n## Results\n")
    for run in ("first", "second"):
        write_cloud(output, summary, f"{CLOUD_BEGIN}\n{run} section\n{CLOUD_END}",
                    f"{CLOUD_BEGIN}\n{run} table\n{CLOUD_END}")
    text, top = output.read_text(), summary.read_text()
    assert "| crash | 20 |" in text and "second section" in text and "first" not in text
    assert text.count(CLOUD_BEGIN) == 1
    assert "second table" in top and "first" not in top
    assert top.index("second table") < top.index(MARKER) < top.index("## Results")  # above run.py's part


def test_cloud_drills_report_the_disruption_percentiles_and_a_service_that_never_came_back() -> None:
    from benchmarks.cloud_drills import CloudDrillResult
    from benchmarks.failover import render_cloud, summarize_cloud

    drills = [CloudDrillResult("rolling-restart", "every replica", d, 0.02, 10.0, 100, f, [],
                               {"no response RemoteProtocolError @ SIGTERM cloud-2": f} if f else {},
                               [("SIGTERM cloud-2", 3.2)])
              for d, f in ((0.05, 0), (0.03, 0), (math.inf, 2))]
    rows = {"rolling-restart": summarize_cloud("rolling-restart", drills)}
    assert rows["rolling-restart"]["p50"] == 0.05 and rows["rolling-restart"]["failed_total"] == 2
    section, summary = render_cloud(rows, {"rolling-restart": drills}, 30.0, "rolling-restart x 3")
    assert "| 3 | 50 ms | none back | none back | 20 ms |" in section
    assert "2 x no response RemoteProtocolError @ SIGTERM cloud-2 (steps: SIGTERM cloud-2 +3.20)" in section
    assert "- rolling-restart: 50, 30, inf [2]" in section
    assert "| 3 | 50 ms |" in summary and "Failed requests" not in summary
