"""The child side of the code sandbox (rlhf/reward/sandbox.py): confine this process, run the program.

Run as `python -I -S sandbox_child.py` (standard library only; it is started by file path, not
imported). It reads one JSON job from stdin: {"code", "tests", "workdir", "isolate", "uid",
"limits"}, then
1. with `isolate` (root, inside fresh mount/network/PID namespaces made by `unshare`): makes the
   working directory the only writable mount, and switches to an unprivileged `uid` that keeps
   only the right to read any file (CAP_DAC_READ_SEARCH: the interpreter may live under /root);
2. sets the resource limits (address space, CPU seconds, file size, processes, open files, no core);
3. installs an audit hook that refuses sockets, process creation and writes outside the working
   directory (a guard against honest mistakes; it is in-process and not a security boundary);
4. runs the code, then the tests (their assertions instrumented by the parent), and writes one
   line per event to the result pipe: `P <id>` / `F <id> <kind> <message>` for an assertion's
   first pass/failure, `X <kind> <message>` for an exception that stopped the program, `D` at the end.
"""

import os
import sys

sys.path = [p for p in sys.path if p != os.path.dirname(os.path.abspath(__file__))]  # no sibling modules

import contextlib  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402

_RESULT_FD = -1  # set from the job
_MS_RDONLY, _MS_REMOUNT, _MS_BIND = 1, 32, 4096
_CAP_DAC_READ_SEARCH = 2
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _emit(line):
    with contextlib.suppress(OSError):
        os.write(_RESULT_FD, (line.replace("\n", " ")[:500] + "\n").encode("utf-8", "replace"))


def _mount_points():
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")  # \040 for spaces
            points.append((point, fields[5].split(",")))
    return points


def _isolate(workdir, uid):
    """Inside new namespaces, as root: read-only everything but `workdir`, then become `uid`."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def mount(source, target, flags):
        if libc.mount(source.encode(), target.encode(), None, flags, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount {target}: {os.strerror(err)}")

    mount(workdir, workdir, _MS_BIND)  # its own writable mount, left out of the remounts below
    keep = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}
    for point, options in _mount_points():
        if point == workdir:
            continue
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        for option in options:
            flags |= keep.get(option, 0)
        mount("none", point, flags)
    # Switch user but keep the permitted capabilities, then keep only CAP_DAC_READ_SEARCH.
    if libc.prctl(8, 1, 0, 0, 0) != 0:  # PR_SET_KEEPCAPS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    mask = 1 << _CAP_DAC_READ_SEARCH
    data = (ctypes.c_uint32 * 6)(mask, mask, 0, 0, 0, 0)  # effective, permitted, inheritable (x2 words)
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def _set_limits(limits):
    mb = 1024 * 1024
    cpu = int(limits["cpu_s"])
    for which, soft, hard in (
        (resource.RLIMIT_AS, limits["memory_mb"] * mb, limits["memory_mb"] * mb),
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_FSIZE, limits["file_size_mb"] * mb, limits["file_size_mb"] * mb),
        (resource.RLIMIT_NPROC, limits["processes"], limits["processes"]),
        (resource.RLIMIT_NOFILE, 64, 64),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        resource.setrlimit(which, (soft, hard))


def _guard(workdir):
    """Audit hook: no sockets, no new processes, no writes outside `workdir`."""
    inside = os.path.realpath(workdir) + os.sep
    realpath, fspath = os.path.realpath, os.fspath
    refused = {
        "socket.__new__": "network access",
        "socket.getaddrinfo": "network access",
        "os.fork": "process creation",
        "os.forkpty": "process creation",
        "os.system": "process creation",
        "os.exec": "process creation",
        "os.posix_spawn": "process creation",
        "os.spawn": "process creation",
        "subprocess.Popen": "process creation",
        "os.kill": "signalling processes",
        "os.killpg": "signalling processes",
    }
    path_events = {"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.chmod", "os.chown", "os.symlink"}
    path_events |= {"os.link", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile"}

    def outside(path):
        if isinstance(path, int):
            return False
        try:
            full = realpath(fspath(path))
        except (TypeError, ValueError):
            return True
        return full != inside[:-1] and not full.startswith(inside) and full != "/dev/null"

    def hook(event, args):
        if event in refused:
            raise PermissionError(f"sandbox: {refused[event]} is not allowed ({event})")
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS
            )
            if writing and outside(path):
                raise PermissionError(f"sandbox: writing outside the working directory ({path})")
        elif event in path_events:
            paths = args[:2] if event in ("os.rename", "os.link") else args[:1]
            if event in ("os.symlink", "shutil.copyfile"):
                paths = args[1:2]  # what is made; the source may be anywhere
            if event == "os.truncate" and isinstance(args[0], int):
                return
            if any(outside(p) for p in paths):
                raise PermissionError(f"sandbox: {event} outside the working directory")

    sys.addaudithook(hook)


class _Tally:
    """Receives the instrumented assertions' outcomes (first pass and first failure of each)."""

    def __init__(self):
        self.passed, self.failed = set(), set()

    def ok(self, i):
        if i not in self.passed:
            self.passed.add(i)
            _emit(f"P {i}")

    def fail(self, i, exc):
        if i not in self.failed:
            self.failed.add(i)
            kind = "assertion" if isinstance(exc, AssertionError) else "crash"
            _emit(f"F {i} {kind} {type(exc).__name__}: {exc}")


def _kind(exc):
    if isinstance(exc, SyntaxError):
        return "syntax"
    return "assertion" if isinstance(exc, AssertionError) else "crash"


def main():
    global _RESULT_FD
    job = json.loads(sys.stdin.read())
    sys.stdin.close()
    _RESULT_FD = job["result_fd"]
    sys.path.extend(p for p in job.get("path", []) if p not in sys.path)
    workdir = job["workdir"]
    try:
        if job["isolate"]:
            _isolate(workdir, job["uid"])
        os.chdir(workdir)
        _set_limits(job["limits"])
    except Exception as exc:  # the sandbox itself failed: the parent raises, this is no sample's fault
        _emit(f"S {type(exc).__name__}: {exc}")
        return
    try:
        code = compile(job["code"], "<solution>", "exec")
    except (SyntaxError, ValueError) as exc:
        _emit(f"X syntax {type(exc).__name__}: {exc}")
        return
    tests = compile(job["tests"], "<tests>", "exec")
    namespace = {"__name__": "solution", "__builtins__": __builtins__, "_rlhf_tally_": _Tally()}
    _guard(workdir)
    try:
        exec(code, namespace)
        exec(tests, namespace)
    except BaseException as exc:  # noqa: BLE001 - the program's failure is the result
        _emit(f"X {_kind(exc)} {type(exc).__name__}: {exc}")
        return
    for name in job.get("call", []):  # test functions the tests define but do not call: each one runs
        try:
            namespace[name]()
        except Exception as exc:  # noqa: BLE001 - recorded; the next test function still runs
            _emit(f"X {_kind(exc)} {name}: {type(exc).__name__}: {exc}")
        except BaseException as exc:  # noqa: BLE001 - SystemExit and the like stop the program
            _emit(f"X {_kind(exc)} {name}: {type(exc).__name__}: {exc}")
            return
    _emit("D")


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (user objects' __del__, atexit handlers of the program)
