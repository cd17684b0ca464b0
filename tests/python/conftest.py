"""pytest setup: import the in-tree binding (python/) and the test helpers."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "python"))
sys.path.insert(0, HERE)

import helpers  # noqa: E402


def pytest_report_header(config):
    import gqmm

    return [f"gqmm {gqmm.version()} from {gqmm.lib_path()}; backends {gqmm.backends()}",
            f"GQMM_TEST_SEED={helpers.seed()}"]


import pytest  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    """The seed at the end too: -q hides the header, and a failure is replayed with it."""
    terminalreporter.write_line(f"GQMM_TEST_SEED={helpers.seed()} (set it to replay this run)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skipped test is a check that did not run: report it as a failure."""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped:
        rep.outcome = "failed"
        rep.longrepr = f"{item.nodeid}: skipped ({rep.longrepr}); gqmm's tests must all run"
