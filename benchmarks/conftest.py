"""Benchmark harness: prints the summary lines that bench_* modules collect in SUMMARY."""

from __future__ import annotations

SUMMARY: list[str] = []


def pytest_terminal_summary(terminalreporter):
    if SUMMARY:
        terminalreporter.section("hescape benchmark summary")
        for line in SUMMARY:
            terminalreporter.write_line(line)
