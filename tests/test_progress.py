"""genexp.progress: nested waits reported as one line with percent and ETA, silent unless turned on."""

from __future__ import annotations

import io
import logging

import pytest

from genexp import progress


def test_track_is_a_plain_iterator_when_nothing_reports():
    """No command turned reporting on (library calls, tests): no task is opened, items pass through."""
    seen = []
    for item in progress.track(range(3), "steps"):
        seen.append((item, list(progress._stack)))
    assert seen == [(0, []), (1, []), (2, [])]


def test_the_overall_share_of_nested_waits():
    """Batch 2 of 4 (one done) with 600 of 1,000 steps of it done: (1 + 0.6) / 4 = 0.4. An inner
    level of unknown length adds nothing; a finished outer level caps at 1."""
    outer, inner = progress.Task("batch", 4), progress.Task("steps", 1000)
    outer.done, inner.done = 1, 600
    assert progress.overall([outer, inner]) == pytest.approx(0.4)
    assert progress.overall([outer, progress.Task("steps", None)]) == pytest.approx(0.25)
    assert progress.describe([outer, inner]) == "batch 2/4 > steps 600/1000"
    outer.done = 4
    assert progress.overall([outer]) == 1.0
    assert progress.describe([outer]) == "batch 4/4"


@pytest.mark.parametrize(("seconds", "text"), [(0.4, "0s"), (42, "42s"), (185, "3m05s"), (3720, "1h02m")])
def test_durations_read_as_people_write_them(seconds, text):
    assert progress.duration(seconds) == text


def test_log_lines_give_the_place_the_percent_and_an_eta(caplog, monkeypatch):
    """Interval 0: a line per update. 10 s per batch: after 1 of 4 batches, 25%, 10 s elapsed and
    an ETA of 10 s x 0.75 / 0.25 = 30 s. A wait that printed ends with a 'done' line."""
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    with caplog.at_level(logging.INFO, logger="genexp"), progress.reporting(progress.LogLines(0.0)):
        for _ in progress.track(range(4), "batch"):
            now[0] += 10.0
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "batch 1/4 | 25% | 10s elapsed, ETA 30s", lines
    assert lines[-2] == "batch 4/4 | 100% | 40s elapsed", lines
    assert lines[-1] == "batch done in 40s", lines
    assert progress._stack == []


def test_a_wait_that_fails_leaves_no_stale_level():
    """An exception inside a tracked loop (a sampler's NaN check, a signal) closes its level."""
    with progress.reporting(progress.LogLines(3600.0)), pytest.raises(ValueError):
        for _ in progress.track(range(3), "steps"):
            raise ValueError("boom")
    assert progress._stack == []


def test_inner_loops_report_inside_the_outer_one(caplog):
    """A sampler's steps inside a batch loop: one line names both, with the overall share."""
    with caplog.at_level(logging.INFO, logger="genexp"), progress.reporting(progress.LogLines(0.0)):
        for _ in progress.track(range(2), "sampling batch"):
            for _ in progress.track(range(5), "DDPMSampler steps"):
                pass
    lines = [r.getMessage() for r in caplog.records]
    assert "sampling batch 2/2 > DDPMSampler steps 3/5 | 80% |" in "\n".join(lines), lines


def test_quiet_waits_print_nothing(caplog):
    """A wait shorter than the interval prints no line at all (no 'done' either)."""
    with caplog.at_level(logging.INFO, logger="genexp"), progress.reporting(progress.LogLines(3600.0)):
        list(progress.track(range(100), "steps"))
    assert caplog.records == []


def test_a_terminal_gets_a_bar_and_a_file_gets_log_lines(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert isinstance(progress.auto(stream=Terminal()), progress.Bar)
    assert isinstance(progress.auto(stream=io.StringIO()), progress.LogLines)
    assert progress.auto(enabled=False) is None
    monkeypatch.setenv(progress.INTERVAL_ENV, "2.5")
    assert progress.LogLines().interval == 2.5
    monkeypatch.setenv(progress.INTERVAL_ENV, "soon")
    assert progress.LogLines().interval == progress.LOG_INTERVAL_S


def test_the_bar_follows_the_overall_share():
    bar = progress.Bar()
    with progress.reporting(bar):
        for i in progress.track(range(4), "batch"):
            if i == 2:
                assert bar.bar.n == 500  # permille: 2 of 4 done
    assert bar.bar is None  # closed with the wait


def test_a_training_run_reports_its_sample_grid_and_test_bound(tiny_cfg, caplog, monkeypatch):
    """The waits after training report where they are when the output is not a terminal (pytest's
    is not): the grid's sampler steps and the test epoch's bits/dim bound, nested in it."""
    from genexp.commands.train import train

    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    with caplog.at_level(logging.INFO, logger="genexp"):
        train(tiny_cfg("logger=none", model="ddpm"))
    lines = "\n".join(r.getMessage() for r in caplog.records)
    assert "sample grid (epoch_001) 1/1 > DPMSolverPPSampler steps 5/10 | 50% |" in lines, lines
    # only the batch holding the bound's model.bpd_images=8 images counts: it is nearly all of the wait
    assert "test batches with bits/dim 1/1 > bits/dim bound timesteps 2/4 | 50% |" in lines, lines
    assert "test bits/dim of up to 8 test images by the variational bound over 4 of 20 timesteps" in lines
    assert progress._stack == []


def test_compare_names_the_job_of_a_sweep_and_its_eta(monkeypatch):
    """Hydra's '#k : overrides' job-start line: job k+1 of N; before any job ended the ETA is N
    budgets (at least), after k jobs in T seconds it is T / k per job left."""
    from genexp.commands.compare import JobClock

    now = [100.0]
    monkeypatch.setattr("genexp.commands.compare.time.monotonic", lambda: now[0])
    clock = JobClock(total=4, budget_s=60.0)
    assert clock.line("[2026-12-02 16:00:00,000][HYDRA] Launching 4 jobs locally") is None
    first = clock.line("[2026-12-02 16:00:00,001][HYDRA] \t#0 : model=ae seed=0")
    assert first == "compare: job 1/4 (model=ae seed=0) | 0s elapsed, ETA ≥4m00s"
    now[0] += 150.0  # two jobs in 150 s: 75 s each, two left
    third = clock.line("[2026-12-02 16:02:30,000][HYDRA] \t#2 : model=vae seed=0")
    assert third == "compare: job 3/4 (model=vae seed=0) | 2m30s elapsed, ETA ~2m30s"


def test_a_short_last_batch_weighs_what_it_costs(caplog):
    """256 images in batches of 250 and 6: halfway through the first batch's steps is
    125/256 = 49% of the wait, not 25% (half of one of two batches); the count reads in images."""
    import torch

    from genexp.metrics.sampling import sample_uint8

    class Stepped(torch.nn.Module):
        def sample(self, n, generator=None):
            for _ in progress.track(range(4), "steps"):
                pass
            return torch.zeros(n, 1, 2, 2)

    with caplog.at_level(logging.INFO, logger="genexp"), progress.reporting(progress.LogLines(0.0)):
        sample_uint8(Stepped(), 256, 250)
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("sampled images 0/256 > steps 2/4 | 49% |") for line in lines), lines
    assert any(line.startswith("sampled images 250/256 > steps 2/4 | 99% |") for line in lines), lines
