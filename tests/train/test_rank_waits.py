"""`Ranks.wait` (tests/support/progress.py): the multi-process tests wait on their processes while these
keep writing, and fail with their output once they stop. Plain Python processes stand in for ranks
here, with limits of a few seconds instead of minutes."""

from __future__ import annotations

import os
import time

import pytest

from tests.support.progress import Limits
from tests.train.fixtures_train import PYTHON, Ranks, env, start_ranks

QUICK = Limits(stall=2.0, startup=5.0, after_failure=1.0, ceiling=30.0)
WAITS_OUT_LIMITS = pytest.mark.slow  # processes run past a limit of seconds on purpose: 3-5 s each


def start_ranks_each(tmp_path, scripts: list[str], watched: tuple[str, ...]) -> Ranks:
    """One process per script, as one group."""
    parts = []
    for i, script in enumerate(scripts):
        folder = tmp_path / f"logs{i}"
        folder.mkdir()
        parts.append(start_ranks([PYTHON, "-u", "-c", script], [env()], str(folder), watched))
    return Ranks.together(parts)


TICKS = "import time\nfor i in range({n}):\n    print('step', i)\n    time.sleep({every})\n"


@WAITS_OUT_LIMITS
def test_processes_that_keep_writing_may_run_longer_than_the_stall_limit(tmp_path):
    ranks = start_ranks_each(tmp_path, [TICKS.format(n=20, every=0.25)] * 2, ())
    started = time.monotonic()
    assert ranks.wait(QUICK) == 0
    assert time.monotonic() - started > 2 * QUICK.stall


@WAITS_OUT_LIMITS
def test_a_file_written_under_the_run_folder_is_progress(tmp_path):
    run = tmp_path / "run"
    writes = f"import os, time\nos.makedirs({str(run)!r})\nprint('start')\n"
    writes += (
        f"for i in range(8):\n    open(os.path.join({str(run)!r}, f'step{{i}}'), 'w').close()\n    time.sleep(0.5)\n"
    )
    ranks = start_ranks_each(tmp_path, [writes], (str(run),))
    assert ranks.wait(QUICK) == 0
    assert len(os.listdir(run)) == 8


def test_silent_processes_fail_after_the_stall_limit_with_their_output(tmp_path):
    ranks = start_ranks_each(tmp_path, ["print('loaded the model')\nimport time\ntime.sleep(60)"], ())
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"no progress .* for \d+ s\n--- rank 0 \(exit -9\) ---\nloaded the model"):
        ranks.wait(QUICK)
    assert QUICK.stall < time.monotonic() - started < QUICK.stall + 5
    assert ranks.returncode == -9  # killed


@WAITS_OUT_LIMITS
def test_a_silent_start_gets_the_startup_allowance(tmp_path):
    ranks = start_ranks_each(tmp_path, ["import time\ntime.sleep(3)\nprint('ready')"], ())
    assert ranks.wait(QUICK) == 0  # 3 s silent: over the stall limit, under the startup one


def test_the_peers_of_a_failed_rank_are_stopped_after_the_grace(tmp_path):
    fails = "import sys\nprint('rank 0 fails')\nsys.exit(3)"
    waits = "print('rank 1 waits on rank 0')\nimport time\ntime.sleep(60)"
    ranks = start_ranks_each(tmp_path, [fails, waits], ())
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"(?s)exit 3\).*rank 0 fails.*rank 1 waits on rank 0"):
        ranks.wait(Limits(stall=30.0, after_failure=1.0))
    assert time.monotonic() - started < 10  # the 1 s grace, not the 30 s stall


@WAITS_OUT_LIMITS
def test_endless_progress_stops_at_the_ceiling(tmp_path):
    ranks = start_ranks_each(tmp_path, [TICKS.format(n=1000, every=0.1)], ())
    with pytest.raises(AssertionError, match="still running after 3 s, though progressing"):
        ranks.wait(Limits(stall=1.0, ceiling=3.0))
