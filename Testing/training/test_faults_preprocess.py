"""``ctsliceinterp preprocess`` under faults made for real: ``kill -9`` of a running preprocess, the
half-written case folders it leaves, a truncated array in a cached case, and two runs on one cache.

The kill runs in a supervisor subprocess (this file run as a script) that makes itself the
"subreaper" of what it starts (Linux ``PR_SET_CHILD_SUBREAPER``): the workers orphaned by the kill
become its children, so it sees the moment each one ends, and it kills and reaps any survivor, so
no test leaves processes behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
CASES = 12
CASE_SHAPE = (160, 192, 192)  # 1 mm thin slices, the thick ones simulated: about 0.1 s a case
WORKER_DEATH_LIMIT_S = 3.0


def _preprocess_command(dataset: Path, cache: Path, workers: int = 2) -> list[str]:
    return [sys.executable, "-m", "ctsliceinterp.cli", "preprocess", "--dataset", str(dataset), "--out", str(cache),
            "--workers", str(workers), "--no-progress"]


def _environment() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT / "Backend" / "src"), OMP_NUM_THREADS="1")


def _partials(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.glob("cases/*/.*") if p.name.endswith((".partial", ".old")))


def _snapshot(cache: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(cache)): (p.stat().st_size, p.stat().st_mtime_ns) for p in cache.rglob("*") if p.is_file()}


# --- the supervisor (run as a script) --------------------------------------------------------
def _children(pid: int) -> set[int]:
    try:
        return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def _kill_during_a_case_write(command: list[str], cache: Path) -> dict:
    """Start ``command``, kill -9 it as soon as a case folder is being written, then watch its workers."""
    run = subprocess.Popen(command, env=_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and run.poll() is None:
        workers |= _children(run.pid)
        if _partials(cache):
            break
        time.sleep(0.001)
    run.send_signal(signal.SIGKILL)
    run.wait()
    killed = time.monotonic()
    alive = set(workers)
    while alive and time.monotonic() - killed < WORKER_DEATH_LIMIT_S:
        while True:  # reap the orphans, now our children
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if not pid:
                break
            alive.discard(pid)
        time.sleep(0.01)
    survivors = sorted(alive)
    death_s = None if survivors else round(time.monotonic() - killed, 2)
    quiet_from = _snapshot(cache)
    time.sleep(1.0)
    still_writing = _snapshot(cache) != quiet_from
    for pid in survivors:  # nothing may outlive the test, even a failing one
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    return {"finished_before_kill": run.returncode != -signal.SIGKILL, "workers": sorted(workers),
            "survivors": survivors, "death_s": death_s,
            "partials_left": _partials(cache), "still_writing": still_writing}


def supervise(command: list[str], cache: Path, attempts: int = 5) -> list[dict]:
    """Kill runs until one leaves a half-written case folder behind (the kill can land just after a
    rename); every attempt's workers are checked."""
    import ctypes

    pr_set_child_subreaper = 36
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0)
    reports = []
    for _ in range(attempts):
        reports.append(_kill_during_a_case_write(command, cache))
        if reports[-1]["partials_left"] or reports[-1]["survivors"] or reports[-1]["finished_before_kill"]:
            break
    return reports


if __name__ == "__main__":
    print(json.dumps(supervise(json.loads(sys.argv[1]), Path(sys.argv[2]))))
    sys.exit(0)


# --- the tests -------------------------------------------------------------------------------
import pytest  # noqa: E402  (not needed by the supervisor)

from ctsliceinterp.cli import main as cli_main  # noqa: E402
from ctsliceinterp.core.volume import Volume  # noqa: E402
from ctsliceinterp.data import cache as cache_format  # noqa: E402
from ctsliceinterp.io import write_volume  # noqa: E402
from testsupport import mounted_tmpfs, remount_read_only  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dataset") / "data"
    (root / "A").mkdir(parents=True)
    for i in range(CASES):
        array = np.random.default_rng(i).integers(-1000, 1500, CASE_SHAPE).astype(np.int16)
        write_volume(Volume.from_array(array, (0.8, 0.8, 1.0), (0.0, 0.0, 0.0)), root / "A" / f"case{i:02d}.nii")
    return root


def _report(cache: Path) -> dict[str, dict]:
    return {c["key"]: c for c in json.loads((cache / cache_format.REPORT_FILE).read_text())["cases"]}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the supervisor needs Linux (/proc, PR_SET_CHILD_SUBREAPER)")
def test_kill_9_ends_the_workers_and_the_next_run_cleans_up(dataset, tmp_path):
    cache = tmp_path / "cache"
    done = subprocess.run([sys.executable, __file__, json.dumps(_preprocess_command(dataset, cache)), str(cache)],
                          env=_environment(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    attempts = json.loads(done.stdout)
    for attempt in attempts:
        assert not attempt["finished_before_kill"], "the run ended before it could be killed: make the cases bigger"
        assert len(attempt["workers"]) >= 2, attempt
        assert not attempt["survivors"], f"processes outlived the killed preprocess by {WORKER_DEATH_LIMIT_S} s: {attempt}"
        assert not attempt["still_writing"], attempt
    assert attempts[-1]["partials_left"], f"no kill landed during a case write in {len(attempts)} tries: {attempts}"

    rerun = subprocess.run(_preprocess_command(dataset, cache), env=_environment(), capture_output=True, text=True,
                           timeout=240)
    assert rerun.returncode == 0, rerun.stderr
    assert "half-written" in rerun.stderr
    assert _partials(cache) == []
    report = _report(cache)
    assert len(report) == CASES and all(c["status"] in ("ok", "cached") for c in report.values()), report
    for case in cache_format.iter_cases(cache):
        assert np.asarray(case.array("thin", mmap=False)).shape == (CASE_SHAPE[0], *CASE_SHAPE[1:])


def test_truncated_array_is_not_taken_for_cached(dataset, tmp_path):
    cache = tmp_path / "cache"
    args = ["preprocess", "--dataset", str(dataset), "--out", str(cache), "--workers", "1", "--no-progress"]
    assert cli_main(args) == 0
    damaged = cache_format.case_folder(cache, "A", "case03")
    thin = damaged / "thin.npy"
    os.truncate(thin, thin.stat().st_size // 2)  # what an interrupted copy of the cache leaves

    with pytest.raises(cache_format.CacheError, match=r"thin\.npy is truncated"):
        cache_format.CachedCase.open(damaged)
    with pytest.raises(cache_format.CacheError, match=r"case03 is damaged"):
        list(cache_format.iter_cases(cache))

    assert cli_main(args) == 0
    report = _report(cache)
    assert report["A/case03"]["status"] == "ok"
    assert "thin.npy is truncated" in report["A/case03"]["reason"]
    assert {c["status"] for k, c in report.items() if k != "A/case03"} == {"cached"}
    assert cache_format.CachedCase.open(damaged).array("thin").shape == CASE_SHAPE


def test_a_second_run_on_the_same_cache_is_refused(dataset, tmp_path, capsys):
    """Its leftover cleaning would delete the first run's half-written cases."""
    cache = tmp_path / "cache"
    first = subprocess.Popen(_preprocess_command(dataset, cache, workers=1), env=_environment(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list(cache.glob("cases/*/*")) and time.monotonic() < deadline:
            time.sleep(0.005)
        code = cli_main(["preprocess", "--dataset", str(dataset), "--out", str(cache), "--workers", "1", "--no-progress"])
        assert first.poll() is None, "the first run ended before the second started: make the cases bigger"
    finally:
        first.kill()
        first.wait()
    assert code == 2
    assert "another ctsliceinterp preprocess is writing" in capsys.readouterr().err


def test_a_disk_that_fills_up_mid_run_fails_the_cases_that_do_not_fit(dataset, tmp_path):
    """A 40 MB tmpfs holds two cases (14 MB each); the others fail with the reason, nothing half-written stays."""
    with mounted_tmpfs(tmp_path / "tiny", "size=40m") as cache:
        code = cli_main(["preprocess", "--dataset", str(dataset), "--out", str(cache), "--workers", "1", "--no-progress"])
        report = _report(cache)
        ok = sorted(k for k, c in report.items() if c["status"] == "ok")
        failed = [c for c in report.values() if c["status"] == "failed"]
        assert code == 0 and len(ok) == 2 and len(failed) == CASES - 2, report
        for case in failed:
            assert case["reason"].startswith("cannot write ") and "no space left on the device (ENOSPC)" in case["reason"], case
        assert _partials(cache) == []
        assert [case.key for case in cache_format.iter_cases(cache)] == ok


def test_a_read_only_cache_is_refused_in_one_line(dataset, tmp_path, capsys):
    with mounted_tmpfs(tmp_path / "ro", "size=40m") as cache:
        (cache / "cases").mkdir()  # an earlier cache, now on a read-only mount
        remount_read_only(cache)
        code = cli_main(["preprocess", "--dataset", str(dataset), "--out", str(cache), "--workers", "1", "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code == 2
        assert err == f"ctsliceinterp: error: cannot write {cache}: the folder is on a read-only file system (EROFS)"
