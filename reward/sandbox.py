"""Run untrusted Python code against its tests in a confined child process (one per program).

Two modes, chosen once per process (`isolation()`):
* `namespaces` (root, with `unshare`): the child runs in fresh network, mount and PID namespaces:
  no network device but a downed loopback, every mount read-only except its working directory, a
  non-root user id of its own that may only read, and every process it made dies with it;
* `process` (anything else): the same child without namespaces; sockets, new processes and writes
  outside the working directory are refused by an in-process audit hook only.
Both: a wall-clock limit (the process group is killed), RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE,
RLIMIT_NPROC, an empty environment (PATH, LANG, HOME and TMPDIR set to a temporary working
directory, which is removed afterwards). The child's side is reward/sandbox_child.py.

The test code's `assert` statements are counted and instrumented so that one failing assertion
does not hide the others: `Outcome.passed / total` is the fraction of assertions that held.
"""

from __future__ import annotations

import ast
import functools
import json
import logging
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
ERROR_CLASSES = ("ok", "syntax", "timeout", "assertion", "crash")
UID_BASE = 61000  # namespaces mode: sandbox slot k runs as uid UID_BASE + k (own RLIMIT_NPROC count)
_TALLY, _EXC = "_rlhf_tally_", "_rlhf_exc_"


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (not a failure of the program under test)."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0  # wall clock of the whole program (code + tests)
    memory_mb: int = 1024  # address space
    file_size_mb: int = 16  # largest file the program may write
    processes: int = 32  # RLIMIT_NPROC (threads count); root ignores it, see docs/rewards.md


@dataclass
class Outcome:
    """One program's result: `status` is one of ERROR_CLASSES; `detail` the first error, in a line."""

    status: str
    passed: int
    total: int
    detail: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class _Instrument(ast.NodeTransformer):
    """`assert x, m` -> try: assert x, m / except Exception as e: tally.fail(i, e) / else: tally.ok(i)."""

    def __init__(self):
        self.count = 0

    def visit_Assert(self, node: ast.Assert):
        i = self.count
        self.count += 1

        def call(method: str, *args: ast.expr) -> ast.Expr:
            func = ast.Attribute(ast.Name(_TALLY, ast.Load()), method, ast.Load())
            return ast.Expr(ast.Call(func, [ast.Constant(i), *args], []))

        handler = ast.ExceptHandler(ast.Name("Exception", ast.Load()), _EXC, [call("fail", ast.Name(_EXC))])
        return ast.Try([node], [handler], [call("ok")], [])


@functools.lru_cache(maxsize=4096)
def instrument(tests: str) -> tuple[str, int, tuple[str, ...]]:
    """(instrumented test source, number of assertions, top-level `test_*` functions never called in
    it, which the child calls one by one). ValueError when the tests do not parse."""
    try:
        tree = ast.parse(tests, "<tests>")
    except SyntaxError as exc:
        raise ValueError(f"the tests do not parse: line {exc.lineno}: {exc.msg}") from None
    called = {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    calls = tuple(
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test")
        and node.name not in called
        and not node.args.args
    )
    counter = _Instrument()
    tree = ast.fix_missing_locations(counter.visit(tree))
    return ast.unparse(tree), counter.count, calls


# ------------------------------------------------------------------------------------------ slots
_slot_lock = threading.Lock()
_free_slots: list[int] = []
_next_slot = 0


def _take_slot() -> int:
    global _next_slot
    with _slot_lock:
        if _free_slots:
            return _free_slots.pop()
        _next_slot += 1
        return _next_slot - 1


def _give_slot(slot: int) -> None:
    with _slot_lock:
        _free_slots.append(slot)


# ------------------------------------------------------------------------------------------ modes
@functools.lru_cache(maxsize=1)
def isolation() -> str:
    """`namespaces` when this process is root and `unshare` confines a trial program, else `process`."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return "process"
    try:
        trial = run("x = 1", "assert x == 1", Limits(timeout_s=20), mode="namespaces")
    except SandboxError as exc:
        log.warning("code sandbox: namespaces unavailable (%s); using process limits only", exc)
        return "process"
    if not trial.ok:
        log.warning(
            "code sandbox: a trial run in namespaces failed (%s); using process limits only", trial.detail
        )
        return "process"
    return "namespaces"


@functools.lru_cache(maxsize=1)
def _site_packages() -> list[str]:
    import site

    return [p for p in site.getsitepackages() if os.path.isdir(p)]


def _signal_of(returncode: int) -> int | None:
    if returncode < 0:
        return -returncode
    if returncode > 128:  # unshare re-raises its child's signal; a shell would report 128 + n
        return returncode - 128
    return None


# ------------------------------------------------------------------------------------------ running
def run(code: str, tests: str, limits: Limits = Limits(), mode: str | None = None) -> Outcome:
    """Run `code` then `tests` in a fresh confined child; never raises for the program's own faults
    (ValueError for tests that do not parse, SandboxError when the sandbox cannot be set up)."""
    source, total, calls = instrument(tests)
    mode = mode or isolation()
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="rlhf-code-")
    slot = _take_slot()
    if mode == "namespaces":
        os.chown(workdir, UID_BASE + slot, UID_BASE + slot)
    read_fd, write_fd = os.pipe()
    job = {
        "code": code,
        "tests": source,
        "call": list(calls),
        "workdir": workdir,
        "isolate": mode == "namespaces",
        "uid": UID_BASE + slot,
        "result_fd": write_fd,
        "path": _site_packages(),
        "limits": {
            "cpu_s": math.ceil(limits.timeout_s) + 1,
            "memory_mb": int(limits.memory_mb),
            "file_size_mb": int(limits.file_size_mb),
            "processes": int(limits.processes),
        },
    }
    # -S: no site module at start-up (its .pth files can cost more than the program); the child adds
    # the site-packages folders itself, so third-party libraries still import.
    command = [sys.executable, "-I", "-S", CHILD]
    if mode == "namespaces":
        command = ["unshare", "--net", "--mount", "--pid", "--fork", "--kill-child", *command]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
    lines: list[str] = []
    timed_out = False
    try:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(write_fd,),
            cwd=workdir,
            env=env,
            start_new_session=True,  # its own process group, killed as a whole below
        )
        os.close(write_fd)
        write_fd = -1
        try:
            proc.stdin.write(json.dumps(job).encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        timed_out = not _read_lines(read_fd, start + limits.timeout_s, lines)
        if not timed_out:  # the result pipe closed: the program is ending
            try:
                proc.wait(timeout=max(0.0, start + limits.timeout_s - time.monotonic()) + 0.5)
            except subprocess.TimeoutExpired:
                timed_out = True
        with _suppress_lookup():
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if write_fd >= 0:
            os.close(write_fd)
        os.close(read_fd)
        _give_slot(slot)
        shutil.rmtree(workdir, ignore_errors=True)
    return _outcome(lines, total, proc.returncode, timed_out, time.monotonic() - start)


class _suppress_lookup:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, ProcessLookupError | PermissionError)


def _read_lines(fd: int, deadline: float, lines: list[str]) -> bool:
    """Read result lines until end of file (True) or `deadline` (False)."""
    buffer = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return False
        chunk = os.read(fd, 65536)
        if not chunk:
            lines.extend(buffer.decode("utf-8", "replace").splitlines())
            return True
        buffer += chunk
        if len(buffer) > 1 << 20:  # the child writes a few lines per assertion; more is not ours
            return True


def _outcome(lines: list[str], total: int, returncode: int, timed_out: bool, seconds: float) -> Outcome:
    passed: set[int] = set()
    failed: set[int] = set()
    first: tuple[str, str] | None = None  # (kind, message) of the first failure
    done = False
    for line in lines:
        tag, _, rest = line.partition(" ")
        if tag == "S":
            raise SandboxError(f"the code sandbox could not be set up: {rest}")
        if tag == "P":
            passed.add(int(rest))
        elif tag == "F":
            i, kind, message = (rest.split(" ", 2) + [""])[:3]
            failed.add(int(i))
            first = first or (kind, message)
        elif tag == "X":
            kind, _, message = rest.partition(" ")
            if kind == "syntax":
                return Outcome("syntax", 0, max(total, 1), message, seconds)
            first = first or (kind, message)
        elif tag == "D":
            done = True
    sig = _signal_of(returncode)
    if timed_out or sig == signal.SIGXCPU:
        status, detail = "timeout", "time limit exceeded" + (" (CPU)" if sig == signal.SIGXCPU else "")
    elif first is not None:
        status, detail = first
    elif sig is not None:
        status, detail = "crash", f"killed by {signal.Signals(sig).name}"
    elif not done:
        status, detail = "crash", f"exited (status {returncode}) before the tests finished"
    else:
        status, detail = "ok", ""
    if total == 0:  # tests without assertions: the whole program is one test
        return Outcome(status, int(status == "ok"), 1, detail, seconds)
    good = total if status == "ok" else len(passed - failed)
    return Outcome(status, good, total, detail, seconds)
