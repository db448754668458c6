"""The progress reporter: silent when asked, whole lines (no cut bars) when output is a log."""

import io

from tvmedge.core.progress import Reporter


def test_quiet_reporter_prints_nothing():
    out = io.StringIO()
    r = Reporter(False, stream=out)
    r.line("x")
    with r.bar("calibrating", 10) as bar:
        bar.advance(10)
    assert out.getvalue() == ""


def test_bar_in_a_log_is_whole_lines_at_each_tenth():
    out = io.StringIO()  # not a terminal, like a CI log or a pipe
    with Reporter(True, stream=out).bar("tuning (trials)", 64, transient=False) as bar:
        for done in range(0, 65, 4):
            bar.update(completed=done, status=f"kernels sum {100 - done:.2f} ms")
    lines = out.getvalue().splitlines()
    assert 10 <= len(lines) <= 11
    assert lines[-1].startswith("tuning (trials): 64/64 kernels sum 36.00 ms (")
    assert all("…" not in ln for ln in lines)


def test_reporter_of_accepts_a_flag_or_a_reporter():
    r = Reporter(False)
    assert Reporter.of(r) is r
    assert Reporter.of(True).enabled and not Reporter.of(False).enabled
