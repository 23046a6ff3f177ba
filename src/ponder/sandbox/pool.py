"""Run untrusted programs against trusted tests, many at a time, and read the verdicts."""

from __future__ import annotations

import ast
import fcntl
import marshal
import math
import os
import secrets
import stat
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ponder.errors import UserError
from ponder.sandbox import isolation
from ponder.sandbox.capture import run_captured

RUNNER = marshal.dumps(compile(Path(__file__).with_name("runner.py").read_text(encoding="utf-8"), "runner.py", "exec"))
# The sandbox runs the same interpreter as this process, so it can load the runner precompiled
# (compiling it would cost a tenth of a run). This bootstrap reads it from stdin, ahead of the job.
BOOTSTRAP = (
    "import marshal,os,sys\n"
    "n=int(sys.argv[1]);b=b''\n"
    "while len(b)<n:\n c=os.read(0,n-len(b))\n if not c:raise SystemExit(3)\n b+=c\n"
    "exec(marshal.loads(b))\n"
)
# Unsafe runs started by root switch to a uid of their own, which cannot search a private home such as /root where
# the interpreter may live (pyenv). So the grader, still root, opens the interpreter's prefix and imports through
# that descriptor: /proc/self/fd/N reaches the prefix (and the program process, forked, inherits it), nothing else.
REACH_PREFIX = (
    "import os,sys\n"
    "d=f'/proc/self/fd/{os.open(sys.prefix,os.O_PATH|os.O_DIRECTORY)}'\n"
    "sys.path[:]=[d+p[len(sys.prefix):] if p.startswith(sys.prefix+'/') else p for p in sys.path]\n"
)
UNSAFE_WARNING = "ponder.sandbox: WARNING: unsafe mode, model-written code runs WITHOUT isolation (no bubblewrap)"


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0  # wall-clock seconds for the whole run
    memory_mb: int = 512  # address space of each process (worst case: processes x memory_mb per run)
    processes: int = 8  # processes (and threads) of the sandbox user
    file_size_mb: int = 16  # largest file the program may write
    open_files: int = 64
    output_kb: int = 64  # stdout and stderr kept, each; more output than this stops the run
    scratch_mb: int = 64  # size of the private /tmp

    def __post_init__(self):
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise UserError(f"sandbox limit '{name}' must be a positive number, got {value!r}")

    def rlimits(self) -> dict[str, int]:
        return {
            "cpu": max(1, math.ceil(self.timeout)),
            "memory": self.memory_mb << 20,
            "processes": self.processes,
            "file_size": self.file_size_mb << 20,
            "open_files": self.open_files,
        }


@dataclass
class TestOutcome:
    source: str  # first line of the test
    passed: bool
    error: str | None = None


@dataclass
class Result:
    """status: passed | failed | timeout | program_error | output_limit | no_verdict | bad_tests.

    `bad_tests` means the trusted tests themselves are broken (or call nothing of the program):
    the run says nothing about the program, and rewards treat it as "does not apply".
    """

    status: str
    detail: str = ""
    tests: list[TestOutcome] = field(default_factory=list)
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def fraction(self) -> float:
        return sum(t.passed for t in self.tests) / len(self.tests) if self.tests else 0.0


class _Uids:
    """Distinct unprivileged uids for concurrent runs (root only): process limits and signals stay per run.

    Distinct across ponder processes too (ranks on one node): a uid is handed out only with an exclusive flock on
    its lock file, held until the run gives it back. The kernel drops the lock when its holder dies, so a crashed
    process reserves nothing.
    """

    BASE, COUNT = 2_000_000_000, 1_000_000

    def __init__(self):
        self.lock_dir: str | None = None  # made at the first run that needs a uid
        self.held: dict[int, int] = {}  # uid -> descriptor of its locked file
        self.lock = threading.Lock()

    def take(self) -> int:
        with self.lock:
            self.lock_dir = self.lock_dir or _lock_dir()
            for uid in range(self.BASE, self.BASE + self.COUNT):
                if uid in self.held:
                    continue
                path = os.path.join(self.lock_dir, str(uid))
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # another process runs a sandbox as this uid
                    os.close(fd)
                    continue
                self.held[uid] = fd
                return uid
            raise UserError(f"no free sandbox uid: all {self.COUNT} from {self.BASE} are in use")

    def give(self, uid: int) -> None:
        with self.lock:
            fd = self.held.pop(uid)
            fcntl.flock(fd, fcntl.LOCK_UN)  # explicitly: a process forked meanwhile shares the descriptor
            os.close(fd)


def _lock_dir() -> str:
    """A directory of uid locks that only this user can write: root must not open files others could plant."""
    path = os.path.join("/run/lock" if os.path.isdir("/run/lock") else tempfile.gettempdir(), "ponder-sandbox-uids")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise UserError(f"{path} holds the code sandbox's uid locks but is not a directory of this user that only it "
                        "can write; remove it")
    return path


_UIDS = _Uids()
_PROBED: set[tuple] = set()
_DROPS: dict[str, str | None] = {}  # interpreter -> None if unsafe runs as root can switch uid, else why not
_PROBE_LOCK = threading.Lock()


class Sandbox:
    """Runs programs in bubblewrap with resource limits; `run_many` keeps `workers` runs going at once.

    `unsafe=True` runs without bubblewrap and prints a warning on every call. The two-process grader and the
    per-process limits still apply; the process limit only where the run has a uid of its own, which unsafe
    runs have when started by root (see docs/sandbox.md).
    """

    def __init__(self, limits: Limits | None = None, workers: int | None = None, unsafe: bool = False):
        self.limits = limits or Limits()
        self.workers = workers or len(os.sched_getaffinity(0))
        self.unsafe = unsafe
        self.as_root = os.geteuid() == 0
        self._pool: ThreadPoolExecutor | None = None
        self.drop = self.as_root  # runs get a uid of their own: bubblewrap's as root, and unsafe ones as root
        self.cannot_drop: str | None = None
        if not unsafe:
            self.bwrap = isolation.find_bwrap()
            self._probe()
        elif self.as_root:
            self._probe_drop()

    # -- public API ------------------------------------------------------------------------------

    def run(self, program: str, tests, entry_point: str | None = None, setup: str = "") -> Result:
        """Run `program`, then `tests` (a string of Python, or a list of strings, one test each).

        `entry_point` names the program's function that HumanEval-style tests receive as
        `check(candidate)`. `setup` is trusted code run before the tests (e.g. helpers they use).
        """
        self._warn()
        return self._run(dict(program=program, tests=tests, entry_point=entry_point, setup=setup))

    def run_many(self, jobs: list[dict]) -> list[Result]:
        """Run jobs (dicts of `run`'s arguments) on `workers` threads; results in order."""
        self._warn()
        if not jobs:
            return []
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="sandbox")
        return list(self._pool.map(self._run, jobs))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    # -- one run ---------------------------------------------------------------------------------

    def _warn(self) -> None:
        if not self.unsafe:
            return
        if self.drop:
            who = "as an unprivileged uid (it reads what every user may read, and reaches the network)"
        elif self.as_root:
            who = f"as root, with no process limit: it cannot switch to an unprivileged uid here ({self.cannot_drop})"
        else:
            who = "as your own user, with no process limit"
        print(f"{UNSAFE_WARNING}, {who}", file=sys.stderr)

    def _run(self, job: dict, limits: Limits | None = None) -> Result:
        limits = limits or self.limits
        tests = job["tests"]
        if not isinstance(tests, str) and not (isinstance(tests, list) and all(isinstance(t, str) for t in tests)):
            raise UserError(f"tests must be a string of Python or a list of strings, got {type(tests).__name__}")
        nonce = secrets.token_hex(16)
        rlimits = limits.rlimits()
        if self.unsafe and not self.drop:
            # RLIMIT_NPROC counts every process and thread of the uid: on the trainer's own uid, its threads would
            # use it up and the grader could not fork. Bubblewrap's user namespace, or a uid of its own, counts
            # only the run's.
            del rlimits["processes"]
        first = {
            "program": job["program"], "setup": job.get("setup") or "",
            "limits": rlimits, "timeout": limits.timeout,
        }  # fmt: skip
        second = {"tests": tests, "entry_point": job.get("entry_point"), "nonce": nonce}
        stdin = RUNNER + b"".join(_frame(marshal.dumps(x)) for x in (first, second))
        exe, _ = isolation.interpreter()
        uid = _UIDS.take() if self.drop else None
        try:
            boot = REACH_PREFIX + BOOTSTRAP if self.unsafe and uid is not None else BOOTSTRAP
            command = [exe, "-I", "-S", "-B", "-c", boot, str(len(RUNNER))]
            ids = [str(uid), str(uid)] if uid is not None else ["-", "-"]
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
            max_output = limits.output_kb << 10
            grace = limits.timeout + 2.0  # the grader keeps its own deadline; this one is the backstop
            if self.unsafe:
                with tempfile.TemporaryDirectory(prefix="ponder-unsafe-") as scratch:
                    env["HOME"] = scratch
                    if uid is not None:
                        os.chown(scratch, uid, uid)
                    try:
                        done = run_captured(lambda fd: command + [str(fd)] + ids, stdin, grace, max_output, env, cwd=scratch)
                    finally:
                        if uid is not None:
                            _kill_uid(uid)
            else:
                head = isolation.bwrap_argv(self.bwrap, limits.scratch_mb << 20, self.as_root)
                done = run_captured(lambda fd: head + ["--"] + command + [str(fd)] + ids, stdin, grace, max_output, env)
        finally:
            if uid is not None:
                _UIDS.give(uid)
        return _verdict(done, nonce, limits.timeout)

    def _probe_drop(self) -> None:
        """Unsafe runs as root switch to a uid of their own if a trial run can (the interpreter reachable, and
        that uid settable: in a container's user namespace it may not be); else they run as root."""
        exe, _ = isolation.interpreter()
        with _PROBE_LOCK:
            if exe not in _DROPS:
                # json: the program process imports from the interpreter's prefix after the switch
                try:
                    trial = dict(program="import json\ndef f():\n    return 1\n", tests="assert f() == 1")
                    r = self._run(trial, Limits(timeout=30.0))
                    _DROPS[exe] = None if r.passed else (r.stderr.strip().splitlines() or [r.detail])[-1][:200]
                except OSError as e:  # chown to the uid, or the switch before the kill, refused
                    _DROPS[exe] = str(e)
        self.cannot_drop = _DROPS[exe]
        self.drop = self.cannot_drop is None

    def _probe(self) -> None:
        key = (self.bwrap, self.as_root)
        with _PROBE_LOCK:
            if key in _PROBED:
                return
            r = self._run(dict(program="def f():\n    return 1\n", tests="assert f() == 1"), Limits(timeout=30.0))
            if not r.passed and r.detail.startswith("sandbox:"):  # the grader's own: the program's filter failed
                raise UserError(f"the code sandbox cannot filter the program's system calls here ({r.detail}); it needs "
                                "a kernel with seccomp filters (CONFIG_SECCOMP_FILTER); or set `unsafe: true` to run "
                                "model code without isolation")
            if not r.passed:
                why = (r.stderr.strip().splitlines() or [r.detail])[-1]
                raise UserError(f"bubblewrap cannot start a sandbox on this machine ({why}); it needs user namespaces "
                                "when not run as root (sysctl kernel.unprivileged_userns_clone=1) and version 0.8 or "
                                "similar (--size, --perms); or set `unsafe: true` to run model code without isolation")  # fmt: skip
            _PROBED.add(key)


def _kill_uid(uid: int) -> None:
    """Kill what still runs as the run's uid: a daemon in a session of its own escapes the process group's kill.
    kill(-1) by that uid reaches every process of it and no other (and new forks of those are stopped too)."""
    subprocess.run(["/bin/sh", "-c", "kill -9 -1"], user=uid, group=uid, extra_groups=[], env={}, cwd="/",
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)  # fmt: skip


def _frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


def _verdict(done, nonce: str, timeout: float) -> Result:
    """Trust only report lines that carry this run's nonce; no final line means no verdict."""
    names: list[str] = []
    outcomes: dict[int, tuple[bool, str | None]] = {}
    final = None
    for line in done.report.decode("utf-8", "replace").splitlines():
        try:
            rec = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue
        if not isinstance(rec, dict) or rec.get("nonce") != nonce:
            continue
        if "tests" in rec:
            names = [str(n) for n in rec["tests"]]
        elif "test" in rec:
            outcomes[int(rec["test"])] = (rec.get("ok") is True, rec.get("error"))
        elif rec.get("done"):
            final = rec
    tests = [TestOutcome(n, *outcomes.get(i, (False, "not run"))) for i, n in enumerate(names)]
    out, err = (b.decode("utf-8", "replace") for b in (done.stdout, done.stderr))
    if done.killed == "output":
        status, detail = "output_limit", "the program wrote more output than allowed"
    elif final is not None:
        status, detail = str(final.get("status")), str(final.get("detail", ""))
    elif done.killed == "timeout":
        status, detail = "timeout", f"no verdict within {timeout:g} s"
    else:
        status, detail = "no_verdict", f"the grader stopped without a verdict (exit status {done.returncode})"
    if status == "passed" and not (tests and all(t.passed for t in tests)):
        status, detail = "failed", "not every test reported a pass"
    return Result(status, detail, tests, out, err, done.seconds)
