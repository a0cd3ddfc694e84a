"""Shared test plumbing: measured figures recorded with `record_property("measured", ...)` are printed
in the run's summary, so numbers such as SQNR show up in every CI log; `torch_npu`: the recording
stand-in installed as the torch_npu module for one test."""

import sys

import pytest
import torch

from tests import npu_standin


@pytest.fixture
def torch_npu(monkeypatch):
    torch._dynamo.reset()
    module = npu_standin.module()
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    npu_standin.calls.clear()
    yield module
    torch._dynamo.reset()


def pytest_terminal_summary(terminalreporter):
    rows = [
        (report.nodeid, value)
        for report in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", [])
        if report.when == "call"
        for name, value in report.user_properties
        if name == "measured"
    ]
    if rows:
        terminalreporter.section("measured")
        for nodeid, value in rows:
            terminalreporter.write_line(f"{value}  ({nodeid})")
