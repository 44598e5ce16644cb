"""Progress off a terminal is periodic one-line reports with a rate and an ETA (issue 22),
never a carriage-return bar that turns a nohup log into one long line."""

import io

from megatron_sail.progress import Progress, ProgressConfig


def test_off_a_terminal_lines_with_rate_and_eta():
    out = io.StringIO()  # not a tty
    with Progress(
        total=4, desc="preprocess", unit="records", stream=out, config=ProgressConfig(interval_s=0.0)
    ) as bar:
        for _ in range(4):
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("preprocess: 1/4 records (") and "records/s, ETA " in lines[0]
    assert lines[-1].startswith("preprocess: 4/4 records (") and lines[-1].endswith(" done")
    assert len(lines) == 5  # one per update at interval 0, plus the closing line


def test_interval_limits_lines_and_disabled_prints_nothing():
    out = io.StringIO()
    with Progress(total=1000, desc="x", stream=out, config=ProgressConfig(interval_s=3600)) as bar:
        for _ in range(1000):
            bar.update(1)
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[-1]]  # only the close
    quiet = io.StringIO()
    with Progress(total=3, stream=quiet, config=ProgressConfig(enabled=False)) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""
