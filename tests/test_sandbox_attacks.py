"""Attacks a model may write (issue 4), one test each: none may pass the tests or harm the host."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import ponder
from ponder.sandbox import Limits, Sandbox

LIMITS = Limits(timeout=1.5, memory_mb=512, processes=8, output_kb=16)
TESTS = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n    assert candidate(20, 22) == 42\n"
ADD = "def add(a, b):\n    return a + b\n"


@pytest.fixture(scope="module")
def sandbox():
    sb = Sandbox(LIMITS, workers=2)
    yield sb
    sb.close()


def run(sandbox, program, tests=TESTS):
    return sandbox.run(textwrap.dedent(program), tests, entry_point="add")


def sandbox_processes() -> list[str]:
    """Host processes that belong to a sandbox: its uids, or the markers the attacks use."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        uid = int(status.split("Uid:")[1].split()[0])
        if uid >= 2_000_000_000 or "4242.4242" in cmdline or "ponder-daemon" in cmdline:
            found.append(f"{pid} uid={uid} {cmdline[:80]}")
    return found


def gone_soon(seconds=2.0) -> list[str]:
    end = time.monotonic() + seconds
    while (left := sandbox_processes()) and time.monotonic() < end:
        time.sleep(0.05)
    return left


def test_honest_program_passes(sandbox):
    r = run(sandbox, ADD)
    assert r.status == "passed" and [t.passed for t in r.tests] == [True, True, True]


def test_fork_bomb(sandbox):
    r = run(sandbox, """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """)
    assert r.status == "timeout" and r.seconds < LIMITS.timeout + 2.5
    assert gone_soon() == []
    assert run(sandbox, ADD).passed  # the host can still start sandboxes


def test_memory_bomb():
    sandbox = Sandbox(Limits(timeout=5, memory_mb=160), workers=1)  # a small cap: filling it is quick
    r = run(sandbox, """
        hoard = []
        while True:
            hoard.append(bytearray(16 << 20))
        """)
    assert r.status == "program_error" and "MemoryError" in r.detail
    r = run(sandbox, "def add(a, b):\n    return len(' ' * (1 << 40))\n")
    assert r.status == "failed" and all("MemoryError" in t.error for t in r.tests)


def test_infinite_loop(sandbox):
    r = run(sandbox, "def add(a, b):\n    while True:\n        pass\n")
    assert r.status == "timeout" and not any(t.passed for t in r.tests)
    assert LIMITS.timeout - 0.1 < r.seconds < LIMITS.timeout + 2.5


def test_sleeping_forever(sandbox):
    r = run(sandbox, "import time\ntime.sleep(10**6)\n")
    assert r.status == "timeout" and r.seconds < LIMITS.timeout + 2.5


def test_background_process_is_killed(sandbox):
    r = run(sandbox, """
        import os, subprocess, time
        subprocess.Popen(["sleep", "4242.4242"], start_new_session=True)
        if os.fork() == 0:  # a daemon: double fork, new session, renamed
            os.setsid()
            if os.fork() == 0:
                import sys
                os.execv("/bin/sh", ["ponder-daemon", "-c", "sleep 4242.4242"])
            os._exit(0)
        def add(a, b):
            return a + b
        """)
    assert r.status == "passed"  # leaving a process behind is not a failure; surviving the run is
    assert gone_soon() == []


def test_no_network_even_to_loopback(sandbox):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    port = server.getsockname()[1]
    r = run(sandbox, f"""
        import socket
        for host in ("127.0.0.1", "localhost", "8.8.8.8"):
            try:
                socket.create_connection((host, {port}), timeout=0.5)
                print("connected", host)
            except OSError as e:
                print("refused", host, type(e).__name__)
        def add(a, b):
            return a + b
        """)
    with pytest.raises(BlockingIOError):
        server.accept()  # nothing ever reached the host's server
    server.close()
    assert "connected" not in r.stdout and r.stdout.count("refused") == 3


def test_cannot_write_outside_scratch(sandbox, tmp_path):
    targets = [tmp_path / "pwned", Path(os.path.realpath(sys.base_prefix)) / "pwned", Path("/pwned"), Path("/usr/pwned"), Path.home() / "pwned"]
    r = run(sandbox, f"""
        for path in {[str(t) for t in targets]!r}:
            try:
                open(path, "w").write("x")
                print("wrote", path)
            except OSError as e:
                print("denied", path, e.errno)
        open("/tmp/scratch.txt", "w").write("fine")
        print("scratch", open("/tmp/scratch.txt").read())
        def add(a, b):
            return a + b
        """)
    assert r.passed and "wrote" not in r.stdout and r.stdout.count("denied") == len(targets)
    assert "scratch fine" in r.stdout
    assert not any(t.exists() for t in targets)


def test_cannot_read_host_files_or_secrets(sandbox, monkeypatch):
    secret = "s3cr3t-" + os.urandom(8).hex()
    monkeypatch.setenv("PONDER_TEST_SECRET", secret)
    project_file = Path(ponder.__file__).resolve()  # the project's own source
    home = Path.home()
    r = run(sandbox, f"""
        import os
        print(dict(os.environ))
        for path in ({str(project_file)!r}, {str(home / ".bashrc")!r}, "/etc/passwd", "/etc/shadow",
                     "/proc/1/environ", "/proc/self/environ"):
            try:
                print(path, open(path).read()[:2000])
            except OSError as e:
                print("denied", path, e.errno)
        try:
            print("home", os.listdir({str(home)!r}))
        except OSError as e:
            print("denied home", e.errno)
        def add(a, b):
            return a + b
        """)
    assert r.passed
    assert secret not in r.stdout and "PONDER_TEST_SECRET" not in r.stdout
    assert project_file.read_text()[:200] not in r.stdout
    assert "root:" not in r.stdout  # no /etc/passwd
    for line in r.stdout.splitlines():
        if line.startswith("home "):  # only the path down to the interpreter is there, empty otherwise
            prefix = Path(os.path.realpath(sys.base_prefix))
            allowed = {prefix.relative_to(home).parts[0]} if prefix.is_relative_to(home) else set()
            assert set(eval(line[5:])) <= allowed


def test_killing_the_grader_gives_no_pass(sandbox):
    kill_parent = "import os\nos.kill(os.getppid(), 9)\ndef add(a, b):\n    return a + b\n"
    kill_all = "import os\ndef add(a, b):\n    os.kill(-1, 9)\n    return a + b\n"
    good = dict(program=ADD, tests=TESTS, entry_point="add")
    results = sandbox.run_many([dict(good, program=kill_parent), dict(good, program=kill_all), good, good])
    assert [r.status for r in results[:2]] == ["no_verdict", "no_verdict"]
    assert [r.passed for r in results[2:]] == [True, True]  # runs beside them were not touched
    assert gone_soon() == []


def test_flooding_stdout(sandbox):
    r = run(sandbox, "while True:\n    print('x' * 10000)\n")
    assert r.status == "output_limit" and len(r.stdout) <= LIMITS.output_kb << 10
    assert r.seconds < LIMITS.timeout  # stopped at the cap, not at the deadline


def test_ignoring_sigterm(sandbox):
    r = run(sandbox, """
        import signal
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU):
            signal.signal(sig, signal.SIG_IGN)
        def add(a, b):
            while True:
                pass
        """)
    assert r.status == "timeout" and r.seconds < LIMITS.timeout + 2.5
    assert gone_soon() == []


def test_crashing_the_interpreter(sandbox):
    r = run(sandbox, "import ctypes\ndef add(a, b):\n    ctypes.string_at(0)\n")
    assert r.status == "failed"
    assert all("signal 11" in t.error for t in r.tests)
    r = run(sandbox, "import ctypes\nctypes.string_at(0)\n")
    assert r.status == "program_error" and "signal 11" in r.detail


def test_exit_zero_before_the_tests(sandbox):
    r = run(sandbox, "import sys\nsys.exit(0)\ndef add(a, b):\n    return a + b\n")
    assert r.status == "program_error" and "exited with status 0 before the tests ran" in r.detail
    r = run(sandbox, "import os\ndef add(a, b):\n    os._exit(0)\n")
    assert r.status == "failed" and all("exited with status 0" in t.error for t in r.tests)


def test_overriding_eq(sandbox):
    r = run(sandbox, """
        class Anything:
            def __eq__(self, other):
                return True
            __hash__ = object.__hash__
        class Int(int):
            def __eq__(self, other):
                return True
        def add(a, b):
            return Anything() if a > 0 else Int(7)
        """)
    assert r.status == "failed" and not any(t.passed for t in r.tests)
    assert "Anything is not plain data" in r.tests[0].error and "Int is not plain data" in r.tests[1].error


def test_patching_assert_and_test_helpers(sandbox):
    r = run(sandbox, """
        import builtins, sys
        import __main__ as grader                      # the harness code this process inherited
        builtins.AssertionError = type("Never", (Exception,), {})
        builtins.isinstance = lambda *a: True
        def check(candidate):                          # a `check` of its own
            pass
        grader.Link = grader.Remote = grader.which_are_tests = lambda *a, **k: None
        grader.grade = lambda *a, **k: None
        sys.modules["builtins"].__dict__["__import__"] = None
        def add(a, b):
            return 7
        """)
    assert r.status == "failed" and [t.passed for t in r.tests] == [False, False, False]
    assert all(t.error == "AssertionError" for t in r.tests)


def test_redefining_the_tests_own_helpers(sandbox):
    tests = "def is_close(a, b):\n    return abs(a - b) < 1e-9\n\ndef check(candidate):\n    assert is_close(candidate(1, 1), 2.0)\n"
    cheat = "def add(a, b):\n    return 0.0\ndef is_close(a, b):\n    return True\ndef abs(x):\n    return 0\n"
    assert run(sandbox, cheat, tests).status == "failed"
    assert run(sandbox, "def add(a, b):\n    return float(a + b)\n", tests).passed


def test_fake_all_passed_output(sandbox):
    r = run(sandbox, """
        import os, sys
        fake = "{'done': True, 'status': 'passed', 'detail': '', 'nonce': 'guess'}\\n"
        print(fake, "all tests passed")
        report_fd = int(sys.argv[-3])                  # the grader's report pipe, by number
        for target in (report_fd, 1, 2):
            try:
                os.write(target, fake.encode())
            except OSError as e:
                print("no write to", target, e.errno)
        for path in (f"/proc/{os.getppid()}/fd/{report_fd}", f"/proc/{os.getppid()}/mem"):
            try:
                open(path, "wb")
                print("opened", path)
            except OSError as e:
                print("denied", path, e.errno)
        def add(a, b):
            return 7
        """)
    assert r.status == "failed" and not any(t.passed for t in r.tests)
    assert "opened" not in r.stdout and r.stdout.count("denied") == 2
    assert "no write to " in r.stdout  # the report fd is closed in the program's process


def test_program_cannot_see_the_tests(sandbox):
    secret_test = "def check(candidate):\n    assert candidate(1, 2) == 3  # tell-tale-7f3a\n"
    r = sandbox.run(textwrap.dedent("""
        import gc, os
        seen = any("tell-tale" in o for o in gc.get_objects() if isinstance(o, str))
        seen = seen or any("tell-tale" in str(v) for v in globals().values())
        seen = seen or b"tell-tale" in open(f"/proc/{os.getppid()}/cmdline", "rb").read()
        for path in ("mem", "fd/0", "environ"):          # the grader's memory and its stdin, with the tests
            try:
                open(f"/proc/{os.getppid()}/{path}", "rb")
                seen = True
            except OSError:
                pass
        print("seen" if seen else "unseen")
        def add(a, b):
            return a + b
        """), secret_test, entry_point="add")
    assert r.passed and r.stdout.strip() == "unseen"


def test_runs_unprivileged(sandbox):
    r = sandbox.run(textwrap.dedent("""
        import os
        def ids():
            status = open("/proc/self/status").read()
            field = lambda name: status.split(name + ":")[1].split()[0]
            return os.getuid(), os.geteuid(), os.getgid(), field("CapEff"), field("NoNewPrivs"), os.getgroups()
        """), "u, eu, g, caps, nnp, groups = ids()\nassert u == eu and u != 0 and g != 0\nassert caps == '0000000000000000'\nassert nnp == '1' and groups in ([], [g])\n")
    assert r.passed, r


PRIMES = "assert all(map(is_prime, [2, 3, 5, 7, 11]))\nassert not any(map(is_prime, [4, 6, 8, 9]))\n"


def test_raising_stop_iteration_to_end_the_tests_own_loops(sandbox):
    """Re-raised as itself, StopIteration ended map() inside all()/any(): both asserts passed for a function that
    computes nothing. It reaches the tests as a program error, as PEP 479 turns it into one for generators."""
    r = sandbox.run("def is_prime(n):\n    raise StopIteration\n", PRIMES)
    assert r.status == "failed" and [t.passed for t in r.tests] == [False, False]
    assert "StopIteration" in r.tests[0].error


def test_leaving_a_function_out_or_defining_a_test_functions_parameter(sandbox):
    """Which statements are tests came from the program's own names: leaving `mul` out turned its two asserts into
    setup, out of partial credit's count (a wrong program scored 1.0); defining `f` made the tests' `def check_sum(f)`
    a test that passed. Now the tests alone say which are tests."""
    tests = "assert add(1, 2) == 3\nassert mul(2, 3) == 6\nassert mul(4, 5) == 20\n"
    r = sandbox.run(ADD, tests)
    assert r.status == "failed" and [t.passed for t in r.tests] == [True, False, False] and r.fraction == pytest.approx(1 / 3)
    r = sandbox.run("x = 1\n", tests)  # defines nothing the tests use: failed, not unscorable
    assert r.status == "failed" and r.fraction == 0.0
    tests = "def check_sum(f):\n    assert f(1, 2) == 3\ncheck_sum(add)\n"
    r = sandbox.run("def add(a, b):\n    return 0\ndef f():\n    pass\n", tests)
    # the call is the test (it runs check_sum's assert on the program's add), whatever the program calls `f`
    assert r.status == "failed" and [t.source for t in r.tests] == ["check_sum(add)"]
    assert sandbox.run("def add(a, b):\n    return a + b\ndef f():\n    pass\n", tests).status == "passed"


@pytest.mark.skipif(__import__("platform").machine().lower() not in ("x86_64", "aarch64"), reason="filter for x86-64 and arm64")
def test_memory_no_limit_counts_and_the_kernel_keyrings_are_refused(sandbox):
    """SysV shared memory (touched, detached, kept: 2 GiB under a 256 MiB limit) and memfd hold memory that no rlimit
    counts; keyrings outlive the run (a later sample on the same uid read what an earlier one left) and may hold the
    host session's keys. The program's calls to them fail with ENOSYS; ctypes (libffi's callbacks) still works."""
    import platform

    from ponder.sandbox.runner import DENIED

    keyctl = DENIED[platform.machine().lower()][1][-1]
    program = f'''
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def probe():
    out = [libc.shmget(0, 1 << 20, 0o1600), ctypes.get_errno(), libc.syscall({keyctl}, 0, 0), ctypes.get_errno()]
    try:
        os.memfd_create("x")
    except OSError as e:
        out.append(e.errno)
    out.append(ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 7)())
    return out
'''
    r = sandbox.run(program, "assert probe() == [-1, 38, -1, 38, 38, 7]")
    assert r.status == "passed", r.detail


def test_a_kernel_without_seccomp_filters_is_one_line_at_start(monkeypatch):
    """Where the program's filter cannot be installed, no program runs (its memory could outgrow the limits): the
    sandbox's start-up probe says why in one line, rather than every sample failing to load."""
    import marshal

    from ponder.errors import UserError
    from ponder.sandbox import pool

    source = (Path(pool.__file__).with_name("runner.py").read_text(encoding="utf-8")
              .replace("    machine = platform.machine().lower()\n", "    raise OSError(1, 'no filter here')\n", 1))
    monkeypatch.setattr(pool, "RUNNER", marshal.dumps(compile(source, "runner.py", "exec")))
    monkeypatch.setattr(pool, "_PROBED", set())
    with pytest.raises(UserError, match=r"^the code sandbox cannot filter the program's system calls here \(sandbox: no "
                                        r"filter here\)"):
        Sandbox(LIMITS, workers=1)


def as_ordinary_user(script: str) -> subprocess.CompletedProcess:
    """Run `script` in a fresh interpreter as an ordinary user: nobody (65534) when the tests run as root. The
    sandbox needs only the standard library: if nobody cannot run this interpreter (a pyenv under /root), the
    system's of the same version does."""
    drop = dict(user=65534, group=65534, extra_groups=[]) if os.geteuid() == 0 else {}
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(Path(ponder.__file__).resolve().parents[1])}
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for exe in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        try:
            r = subprocess.run([exe, "-c", "import ponder.sandbox"], capture_output=True, cwd="/", env=env, **drop)
        except OSError:
            continue
        if r.returncode == 0:
            r = subprocess.run([exe, "-c", script], capture_output=True, text=True, timeout=120, cwd="/", env=env, **drop)
            if "user namespaces" in r.stderr:
                pytest.skip(f"bubblewrap cannot run as an ordinary user here: {r.stderr.strip().splitlines()[-1]}")
            return r
    pytest.skip("no interpreter that an ordinary user may run")


DEV_PROBE = '''
import os
def probe():
    out = []
    for path in ("/dev/shm/x", "/dev/x"):
        try:
            open(path, "wb").write(b"x")
            out.append("wrote " + path)
        except OSError:
            out.append("denied")
    open("/dev/null", "wb").write(b"x")
    out.append(len(open("/dev/urandom", "rb").read(8)))
    print(out)
    return out
'''
DEV_TESTS = "assert probe() == ['denied', 'denied', 8]"


def test_dev_shm_holds_no_memory(sandbox):
    """Run by an ordinary user, bubblewrap's /dev was a tmpfs that user could write, without a size cap: a program
    kept host memory in /dev/shm, outside RLIMIT_AS and the scratch cap. /dev is read-only; its devices still work."""
    assert sandbox.run(DEV_PROBE, DEV_TESTS).passed
    script = ("from ponder.sandbox import Limits, Sandbox\nimport sys\n"
              f"r = Sandbox(Limits(timeout=5), workers=1).run({DEV_PROBE!r}, {DEV_TESTS!r})\nprint(r.status, r.stdout, r.tests)\n")
    r = as_ordinary_user(script)
    assert r.stdout.startswith("passed"), r.stdout + r.stderr


UNSAFE_PROBE = '''
import os, time
def probe():
    kids = []
    for i in range(20):  # a bounded fork bomb: the process limit is 8
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        kids.append(pid)
    for pid in kids:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    if os.fork() == 0:  # a daemon: a session of its own, out of the run's process group
        os.setsid()
        if os.fork() == 0:
            os.execv("/bin/sh", ["ponder-daemon", "-c", "sleep 4242.4242"])
        os._exit(0)
    os.wait()
    try:
        secret = open(SECRET).read()
    except OSError:
        secret = "denied"
    no_new_privs = [l.split()[1] for l in open("/proc/self/status") if l.startswith("NoNewPrivs:")][0]
    print(os.getuid(), len(kids), secret, no_new_privs)
    return os.getuid(), len(kids), secret, no_new_privs
'''


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_unsafe_mode_as_root_keeps_the_process_limit(tmp_path, capsys):
    """`unsafe: true` ran the code as root, where RLIMIT_NPROC does not apply: a fork bomb reached the host, a daemon
    outlived the run and root's files were open to it. Started by root, unsafe runs now switch to a uid of their own
    (the interpreter's prefix is reached through a descriptor, so a pyenv under /root works) and what is left of
    that uid is killed after the run. No setuid program gives root back (no_new_privs, as bubblewrap sets it)."""
    secret = tmp_path / "secret"
    secret.write_text("root only")
    secret.chmod(0o600)
    sb = Sandbox(Limits(timeout=5), workers=1, unsafe=True)
    try:
        r = sb.run(UNSAFE_PROBE.replace("SECRET", repr(str(secret))), "u, forks, secret, nnp = probe()\nassert u != 0 and forks < 8 and secret == 'denied' and nnp == '1'")
        left = gone_soon()
    finally:
        for line in sandbox_processes():  # whatever a failed run left behind
            os.kill(int(line.split()[0]), 9)
    assert r.passed, (r.status, r.detail, r.stdout, r.stderr)
    assert left == []
    assert "as an unprivileged uid" in capsys.readouterr().err


def test_unsafe_mode_as_root_that_cannot_switch_uid_runs_as_root(monkeypatch, capsys):
    """Where root cannot switch to the sandbox's uid (a container's user namespace without it), unsafe runs still
    run, as root, and the warning says that no process limit holds."""
    from ponder.sandbox import pool

    if os.geteuid() != 0:
        pytest.skip("needs root")
    monkeypatch.setattr(pool, "_DROPS", {})
    monkeypatch.setattr(pool, "REACH_PREFIX", "raise SystemExit(3)\n")
    sb = Sandbox(Limits(timeout=5), workers=1, unsafe=True)
    assert sb.run(ADD, "assert add(1, 2) == 3").passed
    assert "as root, with no process limit: it cannot switch to an unprivileged uid here (" in capsys.readouterr().err


def test_unsafe_mode_as_an_ordinary_user_beside_many_threads():
    """As an ordinary user, unsafe runs set RLIMIT_NPROC to 8 on the user's own uid, which counts all its threads:
    in a trainer with 8 or more threads the grader could not fork and every completion had no verdict."""
    script = ("import threading\nfrom ponder.sandbox import Limits, Sandbox\n"
              "stop = threading.Event()\n[threading.Thread(target=stop.wait, daemon=True).start() for _ in range(12)]\n"
              "r = Sandbox(Limits(timeout=5), workers=1, unsafe=True).run('def add(a, b):\\n    return a + b\\n', 'assert add(1, 2) == 3')\n"
              "print(r.status, r.detail)\n")
    r = as_ordinary_user(script)
    assert r.stdout.startswith("passed"), r.stdout + r.stderr
    assert "as your own user, with no process limit" in r.stderr


HOLD_UIDS = '''
import os, sys
os.getpid = lambda: int(sys.argv[1])  # the uids once came from the pid: these two pids gave the same ones
from ponder.sandbox import pool
print([pool._UIDS.take() for _ in range(3)], flush=True)
sys.stdin.read()  # hold them until told
'''


@pytest.mark.skipif(os.geteuid() != 0, reason="runs take uids of their own only when started by root")
def test_two_ponder_processes_never_share_a_uid():
    """Each process chose its uids from its pid (pid % 100000, 64 apart): processes whose pids differ by a multiple of
    100000, or with more than 64 workers, shared uids, and one run's processes counted against the other's limit.
    A uid is now reserved across processes (a lock per uid), and freed when its holder dies."""
    from ponder.sandbox import pool

    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(Path(ponder.__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", HOLD_UIDS, str(pid)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env) for pid in (4001, 104001)]  # fmt: skip
    try:
        held = [eval(p.stdout.readline() or "[]") for p in procs]  # the first still holds its uids when the second takes
        assert len(held[0]) == len(held[1]) == 3 and not set(held[0]) & set(held[1]), held
        procs[0].kill()  # a holder that dies frees its uids
        procs[0].wait()
        mine = pool._Uids()
        uid = mine.take()
        mine.give(uid)
        assert uid in held[0]
    finally:
        for p in procs:
            p.kill()
            p.wait()
