"""run_limited and Resident: every way a child can end, and a real parse in a child equals one
in-process. The outcome tests run twice: a child forked for the call (``run_limited``) and a
resident child kept between calls (``Resident.call``); then what only a resident child does.

The memory cap is set relative to this test process's own data size (it inherits it: pytest
with unstructured imported is ~0.7 GB), so the tests do not depend on what ran before.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipelines.errors import (
    CorruptDocument,
    EncryptedDocument,
    MemoryLimitExceeded,
    ParseTimeout,
    PermanentError,
)
from pipelines.nlp import ensure_tagger
from pipelines.parsing import parse_document, warm_up
from pipelines.sandbox import ChildCrashed, Resident, SandboxError, SandboxLimits, run_limited

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
DOCS = DATA / "docs" / "unstructured"
REPO = Path(__file__).resolve().parents[2]


def _data_size() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmData")


def _cap(extra_mib: int) -> int:
    return _data_size() + (extra_mib << 20)


def _gone(pid: int) -> bool:
    """Exited (or a zombie waiting for whoever reaps orphans here)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _wait_gone(pid: int, *, within_s: float = 30.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return False


# --- children that misbehave (module-level functions: the child runs them by reference) -----


def _double(x: int) -> int:
    return 2 * x


def _allocate_forever() -> None:
    hoard = []
    while True:
        hoard.append(bytearray(16 << 20))


def _allocate_then_fail_without_memory_error() -> None:
    """Like libxml2: an allocation fails, the library reports some other error."""
    hoard = []
    try:
        while True:
            hoard.append(bytearray(16 << 20))
    except MemoryError:
        raise ValueError("unknown error") from None


def _sleep_recording_pid(pid_file: str, seconds: float) -> None:
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(seconds)


def _spawn_grandchild_and_sleep(pid_file: str) -> None:
    process = subprocess.Popen(["sleep", "600"])  # noqa: S607 - a test helper
    Path(pid_file).write_text(str(process.pid))
    time.sleep(600)


def _segfault() -> None:
    import faulthandler

    faulthandler.disable()  # pytest's, inherited: keeps its dump out of the test output
    ctypes.string_at(0)


def _exit_without_result() -> None:
    os._exit(7)


def _sys_exit() -> None:
    sys.exit(3)


def _killed_from_outside() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _raise_permanent() -> None:
    raise PermanentError("the blob is gone", code="blob_missing")


class _Unpicklable(Exception):
    def __init__(self, a: int, b: int) -> None:  # pickle calls cls(*args): one arg, fails
        super().__init__(f"{a}-{b}")


def _raise_unpicklable() -> None:
    raise _Unpicklable(1, 2)


def _big_result() -> bytes:
    return os.urandom(1 << 10) * (48 << 10)  # 48 MiB through the pipe


# --- outcomes ----------------------------------------------------------------------------

Runner = Callable[..., Any]


@pytest.fixture(params=["forked", "resident"])
def run(request: pytest.FixtureRequest) -> Iterator[Runner]:
    """``run_limited``, or the ``call`` of a resident child made for the test."""
    if request.param == "forked":
        yield run_limited
        return
    resident = Resident()
    try:
        yield resident.call
    finally:
        resident.close(kill=True)



def test_a_value_comes_back(run: Runner) -> None:
    assert run(_double, args=(21,)) == 42


def test_a_result_larger_than_the_pipe_buffer_comes_back_whole(run: Runner) -> None:
    data = run(_big_result)
    assert len(data) == 48 << 20
    assert data[: 1 << 10] * (48 << 10) == data


def test_allocating_past_the_cap_is_memory_limit_and_the_parent_lives(run: Runner) -> None:
    limits = SandboxLimits(memory_bytes=_cap(256), wall_time_s=120)
    with pytest.raises(MemoryLimitExceeded, match="memory limit") as caught:
        run(_allocate_forever, limits=limits, label="hoarding")
    assert caught.value.code == "memory_limit"
    assert isinstance(caught.value, PermanentError)
    assert run(_double, args=(1,), limits=limits) == 2  # the parent carries on


def test_an_allocation_failure_reported_as_another_error_is_memory_limit(run: Runner) -> None:
    limits = SandboxLimits(memory_bytes=_cap(256), wall_time_s=120)
    with pytest.raises(MemoryLimitExceeded):
        run(_allocate_then_fail_without_memory_error, limits=limits)


def test_past_the_wall_time_the_child_is_killed_with_timeout(run: Runner,
                                                              tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    with pytest.raises(ParseTimeout, match="wall-time limit of 1 s") as caught:
        run(_sleep_recording_pid, args=(str(pid_file), 600),
                    limits=SandboxLimits(wall_time_s=1), label="sleeping")
    assert caught.value.code == "timeout"
    assert _gone(int(pid_file.read_text()))


def _spin(seconds: float) -> int:
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


def test_past_its_cpu_time_the_child_is_stopped_with_timeout(run: Runner) -> None:
    """The CPU limit counts the child's own work from its fork (not the worker's CPU before
    it), so a parse is judged the same on a busy machine as on an idle one."""
    _spin(1.5)  # CPU the parent spends first must not count against the child
    with pytest.raises(ParseTimeout, match="CPU-time limit of 1 s") as caught:
        run(_spin, args=(600,), limits=SandboxLimits(cpu_time_s=1, wall_time_s=60),
                    label="spinning")
    assert caught.value.code == "timeout"
    assert run(_spin, args=(0.2,), limits=SandboxLimits(cpu_time_s=1)) > 0


def test_a_timeout_kills_what_the_child_started(run: Runner, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    with pytest.raises(ParseTimeout):
        run(_spawn_grandchild_and_sleep, args=(str(pid_file),),
                    limits=SandboxLimits(wall_time_s=2))
    assert _wait_gone(int(pid_file.read_text()))


def test_a_segfault_is_corrupt_document_naming_the_signal(run: Runner) -> None:
    with pytest.raises(ChildCrashed, match="SIGSEGV") as caught:
        run(_segfault, label="parsing 'x.pdf'")
    assert caught.value.code == "corrupt_document"
    assert "parsing 'x.pdf' crashed with signal SIGSEGV" in str(caught.value)


def test_an_exit_without_a_result_is_a_crash(run: Runner) -> None:
    with pytest.raises(ChildCrashed, match="exited with status 7"):
        run(_exit_without_result)


def test_sys_exit_in_the_child_never_exits_the_parent(run: Runner) -> None:
    with pytest.raises(ChildCrashed, match="SystemExit: 3"):
        run(_sys_exit)


def test_sigkill_not_sent_by_us_is_the_oom_killer(run: Runner) -> None:
    with pytest.raises(MemoryLimitExceeded, match="out-of-memory killer"):
        run(_killed_from_outside)


def test_a_failure_of_the_sandbox_itself_is_not_blamed_on_the_input(run: Runner) -> None:
    with pytest.raises(SandboxError, match="the sandbox failed") as caught:
        run(_double, args=(1,), limits=SandboxLimits(memory_bytes=2**70))
    assert not isinstance(caught.value, PermanentError)  # retried by the task layer


def test_exceptions_come_back_with_their_code_and_the_childs_traceback(run: Runner) -> None:
    with pytest.raises(PermanentError) as caught:
        run(_raise_permanent)
    assert caught.value.code == "blob_missing"
    assert "_raise_permanent" in str(caught.value.__cause__)  # the child's traceback


def test_an_unpicklable_exception_is_described(run: Runner) -> None:
    with pytest.raises(ChildCrashed, match="_Unpicklable: 1-2"):
        run(_raise_unpicklable)


def test_poll_runs_while_waiting_and_what_it_raises_stops_the_child(
        run: Runner, tmp_path: Path) -> None:
    class Cancelled(Exception):
        pass

    calls = []

    def poll() -> None:
        calls.append(1)
        if len(calls) >= 3:
            raise Cancelled

    pid_file = tmp_path / "pid"
    with pytest.raises(Cancelled):
        run(_sleep_recording_pid, args=(str(pid_file), 600), poll=poll,
                    limits=SandboxLimits(wall_time_s=None, poll_interval_s=0.05))
    assert _gone(int(pid_file.read_text()))


def test_the_parents_threads_run_on_while_the_child_works(run: Runner,
                                                          tmp_path: Path) -> None:
    beats = []
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(0.01):
            beats.append(1)

    thread = threading.Thread(target=heartbeat, daemon=True)
    thread.start()
    try:
        run(_sleep_recording_pid, args=(str(tmp_path / "pid"), 0.5))
        during = len(beats)
    finally:
        stop.set()
        thread.join()
    assert during > 5


@pytest.mark.parametrize("call", ["run_limited", "Resident().call"])
def test_the_child_dies_with_its_parent(tmp_path: Path, call: str) -> None:
    """A Celery hard time limit SIGKILLs the pool process: its parse child must not linger."""
    pid_file = tmp_path / "pid"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pipelines.sandbox import Resident, SandboxLimits, run_limited
        from test_sandbox import _sleep_recording_pid
        {call}(_sleep_recording_pid, args=({str(pid_file)!r}, 600),
               limits=SandboxLimits(wall_time_s=None))
    """)
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.05)
        child = int(pid_file.read_text())
        assert not _gone(child)
    finally:
        parent.kill()
        parent.wait()
    assert _wait_gone(child)


# --- a resident child ----------------------------------------------------------------------


_kept: list[mmap.mmap] = []


def _keep(mib: int) -> int:
    """Leak ``mib`` MiB in the child, as a parser holding on to memory would: a new private
    mapping, written. (Not a bytearray: malloc may place it in free heap the child inherited,
    which the data size already counts, and the test would depend on what ran before it.)"""
    leak = mmap.mmap(-1, mib << 20, flags=mmap.MAP_PRIVATE)
    leak.write(b"x" * (mib << 20))
    _kept.append(leak)
    return os.getpid()


@pytest.fixture
def resident() -> Iterator[Resident]:
    r = Resident()
    try:
        yield r
    finally:
        r.close(kill=True)


def test_a_resident_child_serves_one_call_after_another(resident: Resident) -> None:
    first = resident.call(os.getpid)
    assert first != os.getpid()
    assert resident.call(os.getpid) == first == resident.pid
    assert resident.call(_double, args=(4,)) == 8


def test_an_ordinary_exception_keeps_the_child(resident: Resident) -> None:
    first = resident.call(os.getpid)
    with pytest.raises(PermanentError):
        resident.call(_raise_permanent)
    assert resident.call(os.getpid) == first


def test_the_cpu_limit_is_rearmed_for_each_call(resident: Resident) -> None:
    """Four calls of up to 0.6 s CPU each pass a 1 s limit: a document's budget is its own,
    not what the child spent on the documents before it."""
    limits = SandboxLimits(cpu_time_s=1, wall_time_s=60)
    first = resident.call(os.getpid)
    for _ in range(4):
        assert resident.call(_spin, args=(0.6,), limits=limits) > 0
    assert resident.call(os.getpid) == first
    with pytest.raises(ParseTimeout, match="CPU-time limit of 1 s"):
        resident.call(_spin, args=(600,), limits=limits)


@pytest.mark.parametrize("failing", [_segfault, _sys_exit, _killed_from_outside])
def test_after_a_failure_the_next_call_gets_a_fresh_child(resident: Resident,
                                                          failing: Callable[[], None]) -> None:
    first = resident.call(os.getpid)
    with pytest.raises(PermanentError):
        resident.call(failing)
    assert resident.pid is None
    assert _wait_gone(first)
    assert resident.call(os.getpid) not in (first, os.getpid())


def test_a_timed_out_child_is_killed_and_replaced(resident: Resident, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    with pytest.raises(ParseTimeout):
        resident.call(_sleep_recording_pid, args=(str(pid_file), 600),
                      limits=SandboxLimits(wall_time_s=1))
    killed = int(pid_file.read_text())
    assert _wait_gone(killed)
    assert resident.call(os.getpid) != killed


def test_the_child_is_replaced_after_max_calls() -> None:
    resident = Resident(max_calls=2)
    try:
        first = resident.call(os.getpid)
        assert resident.call(os.getpid) == first
        third = resident.call(os.getpid)
        assert third != first
        assert _wait_gone(first)
    finally:
        resident.close(kill=True)


def test_a_child_whose_heap_grew_is_replaced() -> None:
    resident = Resident(max_growth_bytes=64 << 20)
    try:
        first = resident.call(_keep, args=(16,))
        assert resident.call(_keep, args=(96,)) == first  # answered, then it leaves
        assert _wait_gone(first)
        assert resident.call(os.getpid) != first
    finally:
        resident.close(kill=True)


def test_a_child_killed_between_calls_is_not_blamed_on_the_next(resident: Resident) -> None:
    first = resident.call(os.getpid)
    os.kill(first, signal.SIGKILL)
    assert _wait_gone(first)
    assert resident.call(_double, args=(5,)) == 10


def test_memory_limits_that_change_start_a_new_child(resident: Resident) -> None:
    first = resident.call(os.getpid, limits=SandboxLimits(memory_bytes=_cap(512)))
    assert resident.call(os.getpid, limits=SandboxLimits(memory_bytes=_cap(1024))) != first


# --- real parses -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tagger_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = ensure_tagger(DATA / "nlp" / "ud-english-ewt",
                         tmp_path_factory.getbasetemp() / "pos-tagger-cache")
    warm_up(path)  # as the worker does before its first fork
    return path


@pytest.mark.parametrize(
    "name", ["fake-text.txt", "handbook-1p.docx", "pdf/layout-parser-paper-fast.pdf",
             "stanley-cups.xlsx", "fake.odt"],
)
def test_a_parse_in_the_sandbox_equals_one_in_process(run: Runner, tagger_path: Path,
                                                      name: str) -> None:
    path = DOCS / name
    kwargs = {"path": path, "filename": path.name, "tagger_path": tagger_path}
    in_process = parse_document(**kwargs)  # type: ignore[arg-type]
    sandboxed = run(parse_document, kwargs=kwargs)
    assert sandboxed == in_process
    assert sandboxed.elements


def test_parse_errors_cross_the_sandbox_unchanged(run: Runner, tagger_path: Path,
                                                  tmp_path: Path) -> None:
    path = DOCS / "password_protected.xlsx"
    with pytest.raises(EncryptedDocument):
        run(parse_document, kwargs={"path": path, "filename": path.name,
                                            "tagger_path": tagger_path})
    source = DOCS / "fake.docx"
    blob = tmp_path / "blob"
    blob.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(CorruptDocument, match="fake.docx"):
        run(parse_document, kwargs={"path": blob, "filename": source.name,
                                            "tagger_path": tagger_path})


def test_a_runaway_spreadsheet_is_stopped_by_the_memory_cap(run: Runner, tagger_path: Path) -> None:
    """poc-shared-strings.xlsx (109 kB) grows without end; uncapped it passes 3.5 GB."""
    path = DATA / "hostile/office/apache-poi/spreadsheet/poc-shared-strings.xlsx"
    limits = SandboxLimits(memory_bytes=_cap(512), wall_time_s=280)
    with pytest.raises(MemoryLimitExceeded):
        run(parse_document, kwargs={"path": path, "filename": path.name,
                                            "tagger_path": tagger_path},
                    limits=limits, label=f"parsing {path.name!r}")
