"""master_lost from several replicas: a hint only when every replica held agrees, recently."""

from __future__ import annotations

from connector.agent.node import MasterLostReports

WINDOW = 10.0


def test_one_replica_alone_is_no_hint_until_the_others_agree() -> None:
    reports = MasterLostReports(WINDOW)
    reports.report(7, "cloud-a", now=100.0)
    assert reports.agreed({"cloud-a", "cloud-b"}, now=100.0) == []  # a partition of one path
    reports.report(7, "cloud-b", now=101.5)
    assert reports.agreed({"cloud-a", "cloud-b"}, now=101.5) == [7]  # a crash: both lost it
    assert reports.agreed({"cloud-a", "cloud-b"}, now=101.5) == []  # returned once


def test_a_replica_that_went_away_is_not_waited_for() -> None:
    reports = MasterLostReports(WINDOW)
    reports.report(7, "cloud-a", now=100.0)
    assert reports.agreed({"cloud-a"}, now=100.2) == [7]  # cloud-b's tunnel closed meanwhile


def test_a_single_replica_hints_at_once() -> None:
    reports = MasterLostReports(WINDOW)
    reports.report(3, "cloud-a", now=5.0)
    assert reports.agreed({"cloud-a"}, now=5.0) == [3]


def test_an_old_report_does_not_complete_a_new_one() -> None:
    reports = MasterLostReports(WINDOW)
    reports.report(7, "cloud-a", now=100.0)  # a's path broke, then healed: the master registered again
    reports.report(7, "cloud-b", now=100.0 + WINDOW + 1)  # much later, b's path breaks
    assert reports.agreed({"cloud-a", "cloud-b"}, now=100.0 + WINDOW + 1) == []
    reports.report(7, "cloud-a", now=100.0 + WINDOW + 2)  # now a crash: a reports again
    assert reports.agreed({"cloud-a", "cloud-b"}, now=100.0 + WINDOW + 2) == [7]


def test_reports_are_bounded_to_the_latest_epochs() -> None:
    reports = MasterLostReports(WINDOW, epochs_kept=2)
    for epoch in (1, 2, 3):
        reports.report(epoch, "cloud-a", now=0.0)
    assert sorted(reports.reports) == [2, 3]
    assert reports.agreed({"cloud-a"}, now=0.0) == [2, 3]
