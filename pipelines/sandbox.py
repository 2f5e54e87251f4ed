"""Run a function in a forked child process with a memory cap, a CPU-time and a wall-time limit.

``run_limited(fn, args=..., limits=...)`` forks, caps the child's memory with
``setrlimit``, runs ``fn`` there and sends its result (or its exception) back pickled over a
pipe, which the parent drains as it arrives, so a large result never blocks the child. The
parent only waits: a parse that exhausts memory, loops forever or crashes the interpreter
takes the child down, never the caller (a Celery pool process, whose heartbeat thread goes
on beating meanwhile).

Outcomes, all raised in the parent:

- ``fn``'s return value is returned; an exception ``fn`` raised is raised again (same type and
  attributes; the child's traceback rides along as its ``__cause__``);
- ``MemoryError`` in the child, or a child killed by ``SIGKILL`` that we did not send (the
  kernel's out-of-memory killer) → ``MemoryLimitExceeded`` (``memory_limit``);
- past ``cpu_time_s`` of CPU (``RLIMIT_CPU``: the kernel sends ``SIGXCPU``) or past
  ``wall_time_s`` (the child's process group is killed) → ``ParseTimeout`` (``timeout``). The
  CPU limit is the one that judges the input: it counts the parse's own work, the same on an
  idle machine as on one where the child gets a third of a core. The wall limit, longer, is
  the backstop for a child that hangs without working;
- killed by any other signal (a segfault in a C extension), or gone without a result →
  ``ChildCrashed`` (``corrupt_document``: the input crashed its parser), the signal named;
- the sandbox's own plumbing failed (setting the limits) → ``SandboxError``, a plain
  ``RuntimeError``: not the input's fault, so the task layer retries it.

Why fork, not spawn/forkserver: the parse workers import unstructured (and, with its PDF
module, torch) once per process — 6-9 s. A forked child inherits all of it for ~30-45 ms
of fork on a 650 MB process (docs/parsing.md has the measurements); ``gc.freeze()`` around
the fork keeps the child's collections off the inherited pages, and the parent does not wait
for the child's exit once the result is in. Only the forking thread exists in the child, and
the child touches nothing the parent's other threads own (the heartbeat's database
connection): it runs ``fn``, writes to its pipe and leaves with ``os._exit``, so no atexit
hook, finaliser or inherited connection is ever run or closed from the child. Python
re-initialises the logging and import locks after fork itself.

The memory cap is ``RLIMIT_DATA``: since Linux 4.7 it bounds the private writable mappings
(heap, anonymous ``mmap``, thread stacks), i.e. what a runaway parse allocates, and it is
inherited by what the child runs (pandoc included). ``RLIMIT_AS`` works too but counts address
space: torch's import alone leaves a parse worker at ~1.7 GB of it (1 GB of that is shared
library text), so an ``RLIMIT_AS`` of 3 GiB leaves a parse ~1.3 GB and the headroom moves with
every library upgrade. Libraries that fail an allocation without raising ``MemoryError``
(libxml2 reports "unknown error") are recognised by the child's data size being at the cap
when the error arrives.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import math
import os
import pickle
import resource
import select
import signal
import struct
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, NoReturn, TypeVar

from pipelines.errors import CorruptDocument, MemoryLimitExceeded, ParseTimeout

T = TypeVar("T")

_EXIT_OK: Final = 0
_EXIT_MEMORY: Final = 3  # MemoryError, and not even the short report could be written
_EXIT_INTERNAL: Final = 4  # the child's own plumbing failed
_READ_CHUNK: Final = 1 << 20
_REAP_GRACE_S: Final = 5.0  # after the pipe closes, the child has this long to exit
_CPU_GRACE_S: Final = 5  # the hard RLIMIT_CPU (SIGKILL) this long after the soft one
_PR_SET_PDEATHSIG: Final = 1
# Pre-built, so a child out of memory can still say so.
_MEMORY_REPORT: Final = pickle.dumps(("memory", None, "", 0, 0))
# Children that delivered their result but had not finished exiting: tearing down a forked
# copy of a 600 MB worker takes as long as the fork (~50 ms here), and the caller need not
# wait for it. Reaped (WNOHANG) at the next call; a worker process that exits reaps the rest.
_exiting: set[int] = set()


class ChildCrashed(CorruptDocument):
    """The child died without a result: a signal (segfault, abort) or a bare exit."""


class SandboxError(RuntimeError):
    """The sandbox itself failed (setting limits, reporting): not the input's fault."""


class _ChildTraceback(Exception):
    """The child's formatted traceback, attached as the ``__cause__`` of what it raised."""

    def __str__(self) -> str:
        return f"\n\n(in the sandboxed child process)\n{self.args[0]}"


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    """``memory_bytes``: the child's ``RLIMIT_DATA`` (None: uncapped). ``cpu_time_s``: its
    ``RLIMIT_CPU`` (None: no limit). ``wall_time_s``: killed after this long (None: no limit).
    ``poll_interval_s``: how often ``poll`` is called."""

    memory_bytes: int | None = 3 << 30
    cpu_time_s: int | None = 180
    wall_time_s: float | None = 240.0
    poll_interval_s: float = 0.5


DEFAULT_LIMITS: Final = SandboxLimits()


@dataclass(frozen=True, slots=True)
class ChildReport:
    """What the child measured about itself, returned beside the value by ``run_measured``."""

    value: Any
    peak_rss_bytes: int  # VmHWM
    peak_vm_bytes: int  # VmPeak (address space)
    fork_s: float  # parent's time spent in os.fork()


def run_limited(
    fn: Callable[..., T],
    *,
    args: tuple[Any, ...] = (),
    kwargs: Mapping[str, Any] | None = None,
    limits: SandboxLimits = DEFAULT_LIMITS,
    poll: Callable[[], None] | None = None,
    label: str = "the child",
) -> T:
    """``fn(*args, **kwargs)`` in a limited child; see the module docstring for outcomes.

    ``fn`` and its arguments reach the child through fork; its result and any exception come
    back pickled, so those must pickle. ``poll`` runs in
    the parent every ``limits.poll_interval_s`` while it waits (a cancellation checkpoint):
    whatever it raises kills the child and propagates. ``label`` names the work in messages.
    """
    report = _run(fn, args, dict(kwargs or {}), limits, poll, label, measure=False)
    value: T = report.value
    return value


def run_measured(
    fn: Callable[..., Any],
    *,
    args: tuple[Any, ...] = (),
    kwargs: Mapping[str, Any] | None = None,
    limits: SandboxLimits = DEFAULT_LIMITS,
    label: str = "the child",
) -> ChildReport:
    """Like ``run_limited``, also returning the child's peak memory (for measurements)."""
    return _run(fn, args, dict(kwargs or {}), limits, None, label, measure=True)


def _run(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    limits: SandboxLimits,
    poll: Callable[[], None] | None,
    label: str,
    *,
    measure: bool,
) -> ChildReport:
    read_fd, write_fd = os.pipe()
    parent_pid = os.getpid()
    started = time.perf_counter()
    pid = _fork()
    if pid == 0:  # the child: never returns
        os.close(read_fd)
        _child_main(fn, args, kwargs, limits, write_fd, parent_pid, measure)
    fork_s = time.perf_counter() - started
    os.close(write_fd)
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)  # also done in the child: whichever runs first wins the race
    reaped: int | None = None
    try:
        payload, timed_out = _collect(read_fd, pid, limits, poll)
        if timed_out:
            _kill(pid)
            reaped = _reap(pid, wait_s=None)
            raise ParseTimeout(
                f"{label} ran past its wall-time limit of {limits.wall_time_s:g} s and was stopped"
            )
        if payload:  # the child is exiting: let it finish on its own time
            reaped = _reap(pid, wait_s=0)
            if reaped is None:
                _exiting.add(pid)
                reaped = 0
        else:  # no result: its exit status says why
            reaped = _reap(pid, wait_s=_REAP_GRACE_S)
            if reaped is None:  # closed its pipe but lives on: not ours to wait for
                _kill(pid)
                reaped = _reap(pid, wait_s=None)
    finally:
        os.close(read_fd)
        if reaped is None:  # an exception (poll, a soft time limit) interrupted the wait
            _kill(pid)
            _reap(pid, wait_s=None)
    return _outcome(payload, reaped, label=label, limits=limits, fork_s=fork_s)


def _fork() -> int:
    """``os.fork()``, after flushing stdio (or the child's ``os._exit`` would drop, and a
    normal exit duplicate, what sits in the parent's buffers) and reaping children that have
    left; the heap frozen around it: frozen objects are skipped by the collector, so the
    child's collections do not touch (and copy) every page of the inherited heap."""
    parent_pid = os.getpid()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    _reap_exited()
    gc.freeze()
    try:
        return os.fork()
    finally:
        if os.getpid() == parent_pid:
            gc.unfreeze()


def _collect(
    read_fd: int, pid: int, limits: SandboxLimits, poll: Callable[[], None] | None, *,
    framed: bool = False,
) -> tuple[bytes, bool]:
    """Drain the pipe until EOF, or ``framed``, until one whole frame has come (b"" if the
    pipe closes before); (bytes, timed out?)."""
    chunks: list[bytes] = []
    got, need = 0, -1
    deadline = None if limits.wall_time_s is None else time.monotonic() + limits.wall_time_s
    poller = select.poll()  # not select(): a busy worker may hold fds above FD_SETSIZE
    poller.register(read_fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    while True:
        wait = limits.poll_interval_s
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return b"", True
            wait = min(wait, left)
        if poller.poll(wait * 1000):
            data = os.read(read_fd, _READ_CHUNK)
            if not data:
                return (b"" if framed else b"".join(chunks)), False
            chunks.append(data)
            got += len(data)
            if framed:
                if need < 0 and got >= _FRAME.size:
                    need = _FRAME.size + _FRAME.unpack(b"".join(chunks)[:_FRAME.size])[0]
                if 0 <= need <= got:
                    return b"".join(chunks), False
        if poll is not None:
            poll()


def _kill(pid: int) -> None:
    for kill in (os.killpg, os.kill):  # the group takes pandoc & co. along, when it exists
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, signal.SIGKILL)


def _reap_exited() -> None:
    for pid in list(_exiting):
        if _reap(pid, wait_s=0) is not None:
            _exiting.discard(pid)


def _reap(pid: int, *, wait_s: float | None) -> int | None:
    """The child's wait status; None if it is still running after ``wait_s`` seconds.
    -1 when the status cannot be known (somebody else reaped it, e.g. SIGCHLD ignored)."""
    deadline = None if wait_s is None else time.monotonic() + wait_s
    while True:
        try:
            done, status = os.waitpid(pid, 0 if deadline is None else os.WNOHANG)
        except ChildProcessError:
            return -1
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
            continue
        if done:
            return status
        if deadline is not None and time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


def _outcome(
    payload: bytes, status: int, *, label: str, limits: SandboxLimits, fork_s: float
) -> ChildReport:
    if payload:
        try:
            kind, value, child_tb, rss, vm = pickle.loads(payload)  # noqa: S301 - our own child
        except Exception as exc:  # noqa: BLE001 - a truncated result is a crash, said so below
            raise ChildCrashed(f"{label} sent back an unreadable result ({exc!r})") from exc
        if kind == "ok":
            return ChildReport(value=value, peak_rss_bytes=rss, peak_vm_bytes=vm, fork_s=fork_s)
        if kind == "memory":
            raise MemoryLimitExceeded(_memory_message(label, limits))
        if kind == "internal":  # our plumbing, not the input: retried like any unexpected error
            raise SandboxError(f"{label}: the sandbox failed: {value}") from _ChildTraceback(
                child_tb)
        if kind == "error":
            value.__cause__ = _ChildTraceback(child_tb)
            raise value
        # "unpicklable" / "base": describe it; never re-raise SystemExit & co. in the parent
        raise ChildCrashed(f"{label} failed: {value}") from _ChildTraceback(child_tb)
    _no_result(status, label=label, limits=limits)


def _no_result(status: int, *, label: str, limits: SandboxLimits) -> NoReturn:
    """A child that sent nothing back: its wait status (-1: unknown) says why."""
    if status != -1 and os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGKILL:
            # We only send SIGKILL on timeout (handled before); this one came from the kernel.
            raise MemoryLimitExceeded(
                f"{label} was killed by SIGKILL, most likely by the out-of-memory killer: "
                + _memory_message(label, limits)
            )
        if sig == signal.SIGXCPU:
            raise ParseTimeout(f"{label} used its CPU-time limit of {limits.cpu_time_s} s "
                               "and was stopped")
        raise ChildCrashed(f"{label} crashed with signal {_signal_name(sig)}")
    if status != -1 and os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        if code == _EXIT_MEMORY:
            raise MemoryLimitExceeded(_memory_message(label, limits))
        if code == _EXIT_INTERNAL:
            raise SandboxError(f"{label}: the sandbox child failed before it could report")
        raise ChildCrashed(f"{label} exited with status {code} without a result")
    raise ChildCrashed(f"{label} ended without a result")


def _memory_message(label: str, limits: SandboxLimits) -> str:
    if limits.memory_bytes is None:
        return f"{label} ran out of memory"
    return f"{label} ran past its memory limit of {limits.memory_bytes / 2**20:,.0f} MiB"


def _signal_name(sig: int) -> str:
    try:
        return f"{signal.Signals(sig).name} ({sig})"
    except ValueError:
        return str(sig)


# --- a child kept between calls ----------------------------------------------------------


class Resident:
    """A sandboxed child that outlives one call: forked on the first ``call``, then fed one
    call at a time over a pipe, with ``run_limited``'s limits and outcomes.

    Forking a worker of ~700 MB costs the parent ~25 ms of page-table copying and the child
    ~50 ms of copy-on-write faults and teardown, four times the parse of a small text (19 ms
    here): per document, most of a small file's parse. A resident child pays that once per
    ``max_calls`` documents. Isolation is unchanged where it matters: the child's memory cap
    (``RLIMIT_DATA``) is set once, its CPU limit is re-armed per call (the soft
    ``RLIMIT_CPU`` moved to the CPU used so far plus the call's budget; the hard limit is left
    as inherited, since an unprivileged process cannot raise it again, so the wall-time limit
    is the backstop), and any call that ends in anything but a value or an ordinary exception
    (timeout, memory, a crash, a cancelled wait) ends the child too, so the next call gets a
    fresh one. It also leaves after ``max_calls`` calls, or once its heap has grown by
    ``max_growth_bytes`` since it was forked (what a parser leaked or fragmented is not
    carried into the next document's budget for long).

    One per process, used from one thread at a time; a process forked from the owner (a new
    pool process) starts its own.
    """

    def __init__(self, *, max_calls: int = 100, max_growth_bytes: int = 256 << 20) -> None:
        if max_calls < 1:
            raise ValueError("max_calls must be at least 1")
        self.max_calls = max_calls
        self.max_growth_bytes = max_growth_bytes
        self._pid: int | None = None
        self._owner = 0
        self._to_child = -1
        self._from_child = -1
        self._memory_bytes: int | None = None
        self._calls = 0

    @property
    def pid(self) -> int | None:
        """The resident child's pid, None when there is none (for tests and logs)."""
        return self._pid if self._owner == os.getpid() else None

    def call(
        self,
        fn: Callable[..., T],
        *,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        limits: SandboxLimits = DEFAULT_LIMITS,
        poll: Callable[[], None] | None = None,
        label: str = "the child",
    ) -> T:
        """``fn(*args, **kwargs)`` in the resident child; ``fn`` must pickle by reference (a
        module-level function), its arguments and result by value."""
        if self.pid is not None and _reap(self.pid, wait_s=0) is not None:
            self.close()  # it died while idle (killed from outside): not this call's doing
        if self.pid is None or self._memory_bytes != limits.memory_bytes:
            self.close()
            self._spawn(limits)
        assert self._pid is not None
        pid = self._pid
        request = pickle.dumps((fn, args, dict(kwargs or {}), limits.cpu_time_s),
                               protocol=pickle.HIGHEST_PROTOCOL)
        stays, kill = False, True
        try:
            try:
                _write_all(self._to_child, _frame(request, leaving=False))
                payload, timed_out = _collect(self._from_child, pid, limits, poll, framed=True)
            except BrokenPipeError:  # it died between calls (killed from outside)
                payload, timed_out = b"", False
            self._calls += 1
            if timed_out:
                raise ParseTimeout(f"{label} ran past its wall-time limit of "
                                   f"{limits.wall_time_s:g} s and was stopped")
            if not payload:  # no result: its exit status says why
                status = _reap(pid, wait_s=_REAP_GRACE_S)
                kill = status is None  # closed its pipe but lives on
                _no_result(-1 if status is None else status, label=label, limits=limits)
            leaving, report = _unframe(payload)
            kill = False
            stays = not leaving and self._calls < self.max_calls
            value: T = _outcome(report, 0, label=label, limits=limits, fork_s=0.0).value
            return value
        finally:
            if not stays:
                self.close(kill=kill)

    def close(self, *, kill: bool = False) -> None:
        """End the child: let it leave on its own (EOF on its pipe) or, ``kill``, now."""
        if self._owner != os.getpid():  # inherited through a fork: not ours to end
            self._pid, self._owner = None, os.getpid()
            return
        for fd in (self._to_child, self._from_child):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._to_child = self._from_child = -1
        pid, self._pid = self._pid, None
        if pid is not None:
            if kill:
                _kill(pid)
            if _reap(pid, wait_s=None if kill else 0) is None:  # leaving on its own time
                _exiting.add(pid)

    def _spawn(self, limits: SandboxLimits) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        parent_pid = os.getpid()
        pid = _fork()
        if pid == 0:  # the child: never returns
            os.close(to_child_w)
            os.close(from_child_r)
            _resident_main(to_child_r, from_child_w, limits, parent_pid, self.max_growth_bytes)
        os.close(to_child_r)
        os.close(from_child_w)
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        self._pid, self._owner, self._calls = pid, parent_pid, 0
        self._to_child, self._from_child = to_child_w, from_child_r
        self._memory_bytes = limits.memory_bytes


_FRAME: Final = struct.Struct(">QB")  # payload length, and whether the child leaves after it


def _frame(payload: bytes, *, leaving: bool) -> bytes:
    return _FRAME.pack(len(payload), leaving) + payload


def _unframe(data: bytes) -> tuple[bool, bytes]:
    size, leaving = _FRAME.unpack_from(data)
    return bool(leaving), data[_FRAME.size:_FRAME.size + size]


# --- the child ---------------------------------------------------------------------------


def _child_main(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    limits: SandboxLimits,
    write_fd: int,
    parent_pid: int,
    measure: bool,
) -> None:
    """Set limits, run, report, ``os._exit``. Nothing here may return or raise."""
    exit_code = _EXIT_INTERNAL
    try:
        if not _setup_or_report(limits, parent_pid, write_fd, framed=False):
            os._exit(_EXIT_OK)
        _write_all(write_fd, _encode(_call(fn, args, kwargs, limits, measure)))
        os.close(write_fd)  # EOF now: the kernel frees our memory before it closes files
        exit_code = _EXIT_OK
    except MemoryError:
        with contextlib.suppress(BaseException):
            _write_all(write_fd, _MEMORY_REPORT)
        exit_code = _EXIT_MEMORY
    finally:
        os._exit(exit_code)


def _setup_or_report(limits: SandboxLimits, parent_pid: int, write_fd: int, *,
                     framed: bool) -> bool:
    """Apply the limits; if that fails, tell the parent (our failure, not the input's)."""
    try:
        _child_setup(limits, parent_pid)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as our failure
        report = pickle.dumps(
            ("internal", f"{type(exc).__name__}: {exc}", traceback.format_exc(), 0, 0))
        _write_all(write_fd, _frame(report, leaving=True) if framed else report)
        os.close(write_fd)
        return False
    return True


def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
          limits: SandboxLimits, measure: bool) -> tuple[Any, ...]:
    """``fn``'s outcome as the report tuple (kind, value, traceback, peak RSS, peak VM)."""
    try:
        value = fn(*args, **kwargs)
        rss, vm = _peaks() if measure else (0, 0)
        return ("ok", value, "", rss, vm)
    except MemoryError:
        return ("memory", None, "", 0, 0)
    except Exception as exc:  # noqa: BLE001 - sent to the parent, raised there
        if _caused_by_memory(exc) or _at_memory_cap(limits):
            return ("memory", None, "", 0, 0)
        return ("error", exc, traceback.format_exc(), 0, 0)
    except BaseException as exc:  # noqa: BLE001 - SystemExit etc.: described, not re-raised
        return ("base", f"{type(exc).__name__}: {exc}", traceback.format_exc(), 0, 0)


def _encode(result: tuple[Any, ...]) -> bytes:
    try:
        payload = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        if result[0] == "error":
            pickle.loads(payload)  # noqa: S301 - an exception must also rebuild (cls(*args))
    except MemoryError:
        return _MEMORY_REPORT
    except Exception as exc:  # noqa: BLE001 - e.g. an exception with unpicklable args
        described = f"{type(result[1]).__name__}: {result[1]} (result not picklable: {exc})"
        return pickle.dumps(("unpicklable", described, result[2], 0, 0))
    return payload


def _resident_main(read_fd: int, write_fd: int, limits: SandboxLimits, parent_pid: int,
                   max_growth_bytes: int) -> None:
    """A resident child's loop: read a call, re-arm the CPU limit, run it, answer; leave on
    EOF, after any outcome but a value or an ordinary exception, or once the heap has grown
    past ``max_growth_bytes``. Nothing here may return or raise."""
    exit_code = _EXIT_INTERNAL
    try:
        if not _setup_or_report(replace(limits, cpu_time_s=None), parent_pid, write_fd,
                                framed=True):
            os._exit(_EXIT_OK)
        data_at_start = _status_fields("VmData").get("VmData", 0)
        while True:
            request = _read_frame(read_fd)
            if request is None:  # the parent closed our pipe: done
                exit_code = _EXIT_OK
                break
            fn, args, kwargs, cpu_time_s = pickle.loads(request)  # noqa: S301 - our parent
            if cpu_time_s is not None:
                usage = resource.getrusage(resource.RUSAGE_SELF)
                _, hard = resource.getrlimit(resource.RLIMIT_CPU)
                soft = math.ceil(usage.ru_utime + usage.ru_stime) + cpu_time_s
                resource.setrlimit(resource.RLIMIT_CPU, (
                    soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
            result = _call(fn, args, kwargs, limits, False)
            del fn, args, kwargs
            grown = _status_fields("VmData").get("VmData", 0) - data_at_start
            leaving = result[0] not in ("ok", "error") or grown > max_growth_bytes
            payload = _encode(result)
            del result
            leaving = leaving or payload is _MEMORY_REPORT  # it could not even pickle
            _write_all(write_fd, _frame(payload, leaving=leaving))
            if leaving:
                exit_code = _EXIT_OK
                break
    except MemoryError:
        with contextlib.suppress(BaseException):
            _write_all(write_fd, _frame(_MEMORY_REPORT, leaving=True))
        exit_code = _EXIT_MEMORY
    finally:
        os._exit(exit_code)


def _read_frame(fd: int) -> bytes | None:
    """One request frame from the parent; None on EOF."""
    head = _read_exactly(fd, _FRAME.size)
    if head is None:
        return None
    size, _ = _FRAME.unpack(head)
    return _read_exactly(fd, size)


def _read_exactly(fd: int, size: int) -> bytes | None:
    parts, left = [], size
    while left:
        try:
            data = os.read(fd, min(left, _READ_CHUNK))
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            continue
        if not data:
            return None
        parts.append(data)
        left -= len(data)
    return b"".join(parts)


def _child_setup(limits: SandboxLimits, parent_pid: int) -> None:
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    # Die with the parent (a Celery hard time limit kills the pool process, not us).
    _set_parent_death_signal()
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(_EXIT_INTERNAL)
    # The pool process's handlers (soft time limit, shutdown) are not ours to run.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
                signal.SIGXCPU):
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_DFL)
    # A SIGXCPU's default action dumps core: no core files of documents, anywhere.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if limits.cpu_time_s is not None:
        # fork() starts the child's CPU time at zero. Past the soft limit the kernel sends
        # SIGXCPU (default action: terminate); the hard limit, a little later, is SIGKILL for
        # code that would catch it.
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        cap = limits.cpu_time_s + _CPU_GRACE_S
        new_hard = cap if hard == resource.RLIM_INFINITY else min(cap, hard)
        resource.setrlimit(resource.RLIMIT_CPU, (min(limits.cpu_time_s, new_hard), new_hard))
    if limits.memory_bytes is not None:
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        soft = limits.memory_bytes if hard == resource.RLIM_INFINITY else min(
            limits.memory_bytes, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def _set_parent_death_signal() -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def _caused_by_memory(exc: BaseException) -> bool:
    """A MemoryError anywhere in the chain (a library wrapped it in its own error)."""
    seen: set[int] = set()
    chain: BaseException | None = exc
    while chain is not None and id(chain) not in seen:
        if isinstance(chain, MemoryError):
            return True
        seen.add(id(chain))
        chain = chain.__cause__ or chain.__context__
    return False


def _at_memory_cap(limits: SandboxLimits) -> bool:
    """The data size is within 1/32 (at least 64 MiB) of the cap while the failed call's
    frames, and so its allocations, are still alive: the error was an allocation failure."""
    if limits.memory_bytes is None:
        return False
    data = _status_fields("VmData").get("VmData", 0)
    return data >= limits.memory_bytes - max(64 << 20, limits.memory_bytes // 32)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            raise
        view = view[written:]


def _peaks() -> tuple[int, int]:
    """(VmHWM, VmPeak) in bytes (0 where unknown)."""
    found = _status_fields("VmHWM", "VmPeak")
    return found.get("VmHWM", 0), found.get("VmPeak", 0)


def _status_fields(*keys: str) -> dict[str, int]:
    """Sizes from /proc/self/status, in bytes; {} where there is no /proc."""
    found: dict[str, int] = {}
    with contextlib.suppress(OSError), open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in keys:
                found[key] = int(rest.split()[0]) * 1024
    return found
