"""Run model-written Python in a throw-away subprocess (the `python` tool).

What is enforced (docs/agents.md says the same):
* time: a wall-clock limit (the process group is killed) and a CPU-time limit (RLIMIT_CPU);
* memory: an address-space limit (RLIMIT_AS), also output file size (RLIMIT_FSIZE) and no core files;
* working directory: a fresh empty temporary directory, deleted afterwards; HOME and TMPDIR point
  into it; the interpreter runs isolated (`-I`: no PYTHONPATH, no user site, no script dir);
* network: a new, empty network namespace (`unshare -rn`) where the host allows it; and always an
  audit hook (`sys.addaudithook`, which code cannot remove) that refuses sockets, starting processes
  (subprocess, os.system/exec/spawn/fork) and changing the resource limits; without the namespace
  it refuses ctypes too (so numpy, which loads ctypes, is only importable inside a namespace).
Not enforced: the audit hook is Python-level, so a C extension (or ctypes in a namespace) could get
around it; without `unshare` the child shares the host's network behind that hook alone; it sees the
host's filesystem with the run's user rights (read files, write outside its directory). Run the
rollout workers as an unprivileged user in a container for untrusted workloads.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# Runs in the child: set the limits, install the guard, then run the code (the value of a trailing
# expression is printed, like a notebook cell).
_PRELUDE = r"""
import ast, resource, sys
code = sys.stdin.read()
mem, cpu, fsize, own_network = (int(x) for x in sys.argv[1:5])
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
           "os.forkpty", "pty.", "resource.setrlimit", "resource.prlimit", "sys.addaudithook")
if not own_network:  # ctypes reaches libc past this hook; allowed (numpy needs it) only in a namespace
    BLOCKED += ("ctypes.",)
def guard(event, args):
    if event.startswith(BLOCKED):
        raise PermissionError(f"sandbox: {event} is not allowed")
sys.addaudithook(guard)
del guard
tree = ast.parse(code, "<tool>")
last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
namespace = {"__name__": "__main__"}
exec(compile(tree, "<tool>", "exec"), namespace)
if last is not None:
    value = eval(compile(ast.Expression(last.value), "<tool>", "eval"), namespace)
    if value is not None:
        print(repr(value))
"""


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    returncode: int | None  # None: killed at the time limit
    timed_out: bool
    network_isolated: bool  # ran in its own empty network namespace


@functools.cache
def network_namespace_available() -> bool:
    """Whether `unshare -rn` (user + network namespace, no privileges needed) works on this host."""
    try:
        done = subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def run_python(
    code: str,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_output_chars: int = 4000,
    network_namespace: bool | None = None,
) -> SandboxResult:
    """Run `code` in a fresh interpreter under the limits above; never raises for what the code does.
    `network_namespace`: None uses `unshare -rn` where it works; False forces the audit-hook-only mode."""
    available = network_namespace_available()
    isolated = available if network_namespace is None else network_namespace and available
    with tempfile.TemporaryDirectory(prefix="rlhf-sandbox-") as cwd:
        command = [
            sys.executable,
            "-I",
            "-c",
            _PRELUDE,
            str(memory_mb << 20),
            str(max(1, int(timeout_s) + 1)),
        ]
        command += [str(16 << 20), str(int(isolated))]
        if isolated:
            command = ["unshare", "-rn", "--", *command]
        env = {"PATH": "/usr/bin:/bin", "HOME": cwd, "TMPDIR": cwd, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, killed whole at the time limit
        )
        try:
            out, err = proc.communicate(code.encode("utf-8", "replace"), timeout=timeout_s)
            timed_out, returncode = False, proc.returncode
        except subprocess.TimeoutExpired:
            with _suppress_lookup():
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            timed_out, returncode = True, None
    return SandboxResult(
        _clip(out.decode("utf-8", "replace"), max_output_chars),
        _clip(err.decode("utf-8", "replace"), max_output_chars),
        returncode,
        timed_out,
        isolated,
    )


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit // 2] + "\n...[truncated]...\n" + text[-limit // 2 :]


class _suppress_lookup:
    """The group may be gone already (the process exited just at the limit)."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is ProcessLookupError
