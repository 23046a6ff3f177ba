"""The grader that runs inside the sandbox: `python -I -S -B -c <bootstrap> ... REPORT_FD UID GID`.

Two processes, so that the verdict never depends on code the model wrote:

- the grader (this process) reads the job from stdin in two frames. Frame 1 holds the program, the
  trusted setup code and the limits. It drops privileges, sets the limits, runs the setup, and forks
- the program process, which closes stdin and the report pipe, runs the model's program and then
  only answers calls: "call f with these arguments" -> the result, sent back as plain data
  (None, bool, int, float, complex, str, bytes, list, tuple, set, frozenset, dict; exact types only).

Only after the fork does the grader read frame 2: the tests and a random nonce. So the program can
never see the tests or the nonce, not even in memory it inherited. The tests run here, in a process
that never executes model code; the model's function is a stub that forwards the call. Results are
rebuilt from the wire as genuine builtins, so an overridden `__eq__`, a patched `assert` or
`AssertionError`, a fake "all passed" line or an early exit in the program has no effect on them.
Each finished test is written, with the nonce, to REPORT_FD: a pipe that only this process holds.

Stdlib only (the sandbox sees nothing but the interpreter's standard library), and no imports that
are not needed: interpreter start-up is most of the cost of a run.
"""

import marshal
import os
import select
import signal
import sys
import time

MAX_MESSAGE = 16 << 20  # bytes in one reply from the program
MAX_DEPTH = 100  # nesting of plain data


class NotPlain(TypeError):
    pass


# Not Exceptions: a test's `except Exception` must not turn a dead or hung program into a pass.
class ProgramGone(BaseException):
    """The program process stopped answering (exited, crashed or was killed)."""


class Timeout(BaseException):
    pass


# ---- plain data on the wire: Python literals, parsed without eval -------------------------------
# json would do, but importing it (and re) costs more than the rest of a run.

PyCF_ONLY_AST = 0x400  # compile() to a syntax tree without importing the ast module
BIG = 1 << 13000  # ints this large travel as hex: decimal conversion of huge ints is limited


def lit(x, depth=0):
    """Python literal text for plain data; anything else (subclasses included) raises NotPlain."""
    if depth > MAX_DEPTH:
        raise NotPlain("data nested too deeply")
    t = type(x)
    if x is None or t is bool or t is str or t is bytes:
        return repr(x)
    if t is int:
        return repr(x) if -BIG < x < BIG else f"int({format(x, 'x')!r}, 16)"
    if t is float:
        return repr(x) if x - x == 0 else f"float({repr(x)!r})"  # inf and nan are not literals
    if t is complex:
        return f"complex({lit(x.real)}, {lit(x.imag)})"
    d = depth + 1
    if t is list:
        return "[" + ", ".join(lit(v, d) for v in x) + "]"
    if t is tuple:
        return "(" + "".join(lit(v, d) + ", " for v in x) + ")"
    if t is set:
        return "{" + ", ".join(lit(v, d) for v in x) + "}" if x else "set()"
    if t is frozenset:
        return "frozenset([" + ", ".join(lit(v, d) for v in x) + "])"
    if t is dict:
        return "{" + ", ".join(lit(k, d) + ": " + lit(v, d) for k, v in x.items()) + "}"
    raise NotPlain(f"{t.__name__} is not plain data")


def unlit(text):
    """The plain data a literal describes, built from fresh builtins; ValueError for anything else."""
    try:
        return build(compile(text, "<wire>", "eval", PyCF_ONLY_AST).body)
    except (SyntaxError, TypeError, RecursionError, MemoryError, OverflowError) as e:
        raise ValueError(f"not plain data ({type(e).__name__})") from None


CONSTANTS = (str, bytes, int, float, complex, bool, type(None))
NUMBERS = (int, float)


def build(n):
    kind = type(n).__name__
    if kind == "Constant" and type(n.value) in CONSTANTS:
        return n.value
    if kind == "UnaryOp" and type(n.op).__name__ == "USub" and type(n.operand).__name__ == "Constant":
        v = n.operand.value
        if type(v) in (int, float, complex):
            return -v
    if kind == "List":
        return [build(e) for e in n.elts]
    if kind == "Tuple":
        return tuple(build(e) for e in n.elts)
    if kind == "Set":
        return {build(e) for e in n.elts}
    if kind == "Dict" and None not in n.keys:
        return {build(k): build(v) for k, v in zip(n.keys, n.values)}
    if kind == "Call" and type(n.func).__name__ == "Name" and not n.keywords:
        name, args = n.func.id, [build(a) for a in n.args]
        types = tuple(type(a) for a in args)
        if name == "float" and types == (str,) and args[0] in ("inf", "-inf", "nan"):
            return float(args[0])
        if name == "complex" and len(args) == 2 and all(t in NUMBERS for t in types):
            return complex(*args)
        if name == "frozenset" and types == (list,):
            return frozenset(args[0])
        if name == "set" and not args:
            return set()
        if name == "int" and types == (str, int) and args[1] == 16:
            return int(args[0], 16)
    raise ValueError(f"not plain data ({kind})")


# ---- framing: 4-byte length, then the payload -----------------------------------------------------


def read_exact(fd, n, deadline=None):
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise Timeout
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            raise ProgramGone
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(fd, deadline=None, limit=MAX_MESSAGE):
    n = int.from_bytes(read_exact(fd, 4, deadline), "big")
    if n > limit:
        raise ValueError(f"message of {n} bytes is over the limit")
    return read_exact(fd, n, deadline)


def write_frame(fd, payload: bytes):
    data = len(payload).to_bytes(4, "big") + payload
    while data:
        data = data[os.write(fd, data) :]


# ---- the program process ----------------------------------------------------------------------------

# System calls the program is refused (ENOSYS), by machine: SysV shared memory, message queues and semaphores, and
# memfd_create hold memory that no rlimit counts (2 GiB of segments ran under a 256 MiB limit: touched, detached,
# kept), and the kernel keyrings outlive the run and may hold the host session's keys.
DENIED = {
    "x86_64": (0xC000003E, (29, 30, 31, 67, 64, 68, 319, 447, 248, 249, 250)),
    # shmget shmat shmctl shmdt semget msgget memfd_create memfd_secret add_key request_key keyctl
    "aarch64": (0xC00000B7, (194, 196, 195, 197, 190, 186, 279, 447, 217, 218, 219)),
}


def deny_syscalls():
    """Install a seccomp filter on this process and its children: the DENIED calls fail with ENOSYS, as do calls of
    another ABI (32-bit calls on x86-64 have numbers of their own). False where the machine is not in DENIED."""
    import ctypes
    import platform

    machine = platform.machine().lower()
    if machine not in DENIED:
        return False
    arch, numbers = DENIED[machine]
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, refuse = 0x7FFF0000, 0x00050000 | 38  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | ENOSYS
    tests = ([(jge, 0x40000000)] if machine == "x86_64" else []) + [(jeq, n) for n in numbers]  # x32 calls: refused
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, refuse), (ld, 0, 0, 0)]
    for i, (op, k) in enumerate(tests):
        prog.append((op, len(tests) - i, 0, k))  # to the last instruction: refuse
    prog += [(ret, 0, 0, allow), (ret, 0, 0, refuse)]

    class Instruction(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Instruction))]

    table = (Instruction * len(prog))(*[Instruction(*i) for i in prog])
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    # PR_SET_NO_NEW_PRIVS (a filter needs it without CAP_SYS_ADMIN), then PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    if libc.prctl(38, 1, None, 0, 0) != 0 or libc.prctl(22, 2, ctypes.addressof(Program(len(prog), table)), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "the sandbox could not install its system call filter")
    return True



def serve(program, rfd, wfd):
    """Run the model's program, then answer calls until the grader closes the pipe."""
    import builtins

    ns = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(compile(program, "solution.py", "exec"), ns)
    except SystemExit as e:
        flush()
        os._exit(e.code if isinstance(e.code, int) else 1)
    except Exception as e:
        where = f" (line {e.lineno})" if isinstance(e, SyntaxError) else ""
        write_frame(wfd, lit(("load_error", f"{type(e).__name__}{where}: {e}"[:500])).encode())
        os._exit(1)
    names = [k for k, v in ns.items() if callable(v) and not k.startswith("__")]
    write_frame(wfd, lit(("ready", names)).encode())
    flush()
    while True:
        try:
            _, name, args, kwargs = unlit(read_frame(rfd).decode())
        except ProgramGone:
            flush()
            os._exit(0)
        try:
            reply = lit(("ok", ns[name](*args, **kwargs)))
        except BaseException as e:  # an exception of the program is a test outcome, SystemExit included
            reply = lit(("raise", type(e).__name__, str(e)[:300]))
        flush()
        write_frame(wfd, reply.encode())


def flush():
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:
            pass


# ---- the grader ----------------------------------------------------------------------------------------


class Remote:
    """Stands for one of the program's functions inside the tests."""

    def __init__(self, link, name):
        self.link, self.name = link, name
        self.__name__ = self.__qualname__ = name

    def __call__(self, *args, **kwargs):
        return self.link.call(self.name, args, kwargs)

    def __repr__(self):
        return f"<function {self.name} of the program>"


class ProgramError(Exception):
    """An exception of a type the grader does not know, raised by the program."""


def describe_exit(status: int | None) -> str:
    if status is None:
        return "the program exited"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"the program was killed by signal {sig}" + (" (SIGSEGV)" if sig == 11 else "")
    return f"the program exited with status {os.WEXITSTATUS(status)}"


class Link:
    """The grader's end of the pipes to the program process."""

    def __init__(self, pid, rfd, wfd, deadline):
        self.pid, self.rfd, self.wfd, self.deadline = pid, rfd, wfd, deadline
        self.gone = None  # why the program stopped answering

    def receive(self):
        """The next message from the program as plain data; the program is stopped on any fault."""
        try:
            msg = unlit(read_frame(self.rfd, self.deadline).decode("utf-8"))
            if type(msg) is not tuple or not msg or type(msg[0]) is not str:
                raise ValueError("not a message")
            return msg
        except Timeout:
            self.fail("timeout")
            raise
        except ProgramGone:
            self.fail(None)
        except (ValueError, UnicodeDecodeError) as e:
            self.fail(f"the program sent a malformed reply ({str(e)[:100]})")

    def fail(self, why):
        """Stop the program for good and remember why; raises ProgramGone unless it timed out. A program
        stopped by its CPU-time limit (SIGXCPU) timed out too, and Timeout is raised: that limit and the
        clock reach the deadline together, and which one the grader sees first is a race."""
        try:
            os.kill(self.pid, 9)
        except ProcessLookupError:
            pass
        status = self.wait()
        if why is None and status is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXCPU:
            self.gone = "timeout"
            raise Timeout
        self.gone = why or describe_exit(status)
        if why != "timeout":
            raise ProgramGone(self.gone)

    def call(self, name, args, kwargs):
        if self.gone:
            raise ProgramGone("stopped after the timeout" if self.gone == "timeout" else self.gone)
        payload = lit(("call", name, args, kwargs)).encode()
        try:
            write_frame(self.wfd, payload)
        except OSError:
            self.fail(None)
        reply = self.receive()
        if reply[0] == "ok" and len(reply) == 2:
            return reply[1]
        if reply[0] != "raise" or len(reply) != 3 or type(reply[1]) is not str or type(reply[2]) is not str:
            self.fail("the program sent a malformed reply")
        import builtins

        kind, message = reply[1], reply[2]
        exc = getattr(builtins, kind, None) if kind.isidentifier() else None
        # tests may expect e.g. ValueError from the program; not StopIteration, which would end the test's own loop
        # (`all(map(f, xs))` passed with an f that raised it), as PEP 479 keeps it from ending a generator's caller
        if isinstance(exc, type) and issubclass(exc, Exception) and not issubclass(exc, (StopIteration, StopAsyncIteration)):
            raise exc(message)
        raise ProgramError(f"{kind}: {message}")

    def wait(self) -> int | None:
        """The program's wait status; None if it was reaped already."""
        try:
            return os.waitpid(self.pid, 0)[1]
        except ChildProcessError:
            return None

    def close(self):
        if self.gone is None:
            try:
                os.kill(self.pid, 9)  # it flushed its output after its last answer
            except ProcessLookupError:
                pass
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass


def walk(node):
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(children(n))


def children(n):
    """A syntax node's direct child nodes."""
    for field in n._fields:
        v = getattr(n, field, None)
        if isinstance(v, list):
            yield from (x for x in v if hasattr(x, "_fields"))
        elif hasattr(v, "_fields"):
            yield v


def which_are_tests(units, program_names):
    """Indexes of the units that assert something about the program's results.

    A unit counts when an assert runs as it runs and it reads a program function, or a name that an
    earlier unit computed from one (`r = f(2)` then `assert r == 4`). Asserts about nothing the program
    made (HumanEval's `assert True, "..."`) are not tests and do not dilute partial credit; nor are asserts
    in a function the unit defines but does not call (`def test_f(): assert f(1) == 2` alone only
    defines it: it counted, and passed, with any program at all).
    """
    tainted, tests, defined = set(program_names), [], {}
    for i, (_, stmts) in enumerate(units):
        nodes = [n for s in stmts for n in walk(s)]
        defined.update((s.name, s) for s in stmts if type(s).__name__ == "FunctionDef")
        reads = {n.id for n in nodes if type(n).__name__ == "Name"}
        if not reads & tainted:
            continue
        if "Assert" in {type(n).__name__ for n in executed(stmts, defined)}:
            tests.append(i)
        else:
            tainted |= reads | {n.name for n in nodes if type(n).__name__ in ("FunctionDef", "ClassDef")}
    return tests


DEFINES = ("FunctionDef", "AsyncFunctionDef", "ClassDef", "Lambda")


def executed(stmts, defs):
    """The nodes that run when `stmts` run: not the bodies of what they define, except those of the functions they
    call by name among `defs` (the tests' own top-level functions: `def check(f): assert ...` then `check(add)`)."""
    seen, out, stack = set(), [], list(stmts)
    while stack:
        n = stack.pop()
        out.append(n)
        kind = type(n).__name__
        if kind == "Call" and type(n.func).__name__ == "Name" and n.func.id in defs and n.func.id not in seen:
            seen.add(n.func.id)
            stack.extend(defs[n.func.id].body)
        if kind not in DEFINES:
            stack.extend(children(n))
    return out


def called_tests(stmts):
    """pytest's way: each top-level `def test_*()` without parameters is called right after it is defined (pytest-style
    test files call none of their test functions themselves)."""
    import _ast

    out = []
    for s in stmts:
        out.append(s)
        if type(s).__name__ == "FunctionDef" and s.name.startswith("test") and not _parameters(s.args):
            call = _ast.Expr(value=_ast.Call(func=_ast.Name(id=s.name, ctx=_ast.Load()), args=[], keywords=[]))
            for node in (call, call.value, call.value.func):
                node.lineno, node.col_offset, node.end_lineno, node.end_col_offset = s.lineno, 0, s.lineno, 0
            out.append(call)
    return out


def _parameters(args) -> bool:
    return bool(args.posonlyargs or args.args or args.vararg or args.kwonlyargs or args.kwarg)


def free_names(stmts, trusted: set) -> set:
    """Names the tests read that nothing trusted binds: what they expect of the program, whether it defines them or
    not. (Tests were told apart by the program's own names: one that left a function out turned its asserts into
    setup, which dropped out of partial credit's count, and one that defined a test function's parameter name made
    that def a test that passed.)"""
    return {n.id for s in stmts for n in walk(s) if type(n).__name__ == "Name" and type(n.ctx).__name__ == "Load"} - trusted


def bound_names(stmts):
    """Every name a piece of code binds: assignments, defs, classes, imports."""
    out = set()
    for node in (n for s in stmts for n in walk(s)):
        kind = type(node).__name__
        if kind == "Name" and type(node.ctx).__name__ in ("Store", "Del"):
            out.add(node.id)
        elif kind in ("FunctionDef", "AsyncFunctionDef", "ClassDef"):
            out.add(node.name)
        elif kind == "arg":  # a parameter of the tests' own functions and lambdas
            out.add(node.arg)
        elif kind == "ExceptHandler" and node.name:
            out.add(node.name)
        elif kind == "alias":
            out.add((node.asname or node.name).split(".")[0])
    return out


def units_of(tests, entry_point):
    """(setup statements, check's parameter or None, [(source, [statements])]) from the tests.

    `tests` is a string of Python or a list of them. With an entry point and a `def check(candidate)`
    (HumanEval), the module runs as setup and each statement of check's body is a unit; otherwise
    each top-level statement (or each string of the list) is a unit.
    """
    if isinstance(tests, str):
        src = tests
        mod = compile(src, "tests.py", "exec", PyCF_ONLY_AST)
        lines = src.splitlines()
        check = next((s for s in mod.body if type(s).__name__ == "FunctionDef" and s.name == "check"), None)
        if entry_point and check is not None and check.args.args:
            param = check.args.args[0].arg
            body = check.body
            units = [(segment(lines, s), [s]) for s in body]
            return mod.body, param, units
        return [], None, [(segment(lines, s), called_tests([s])) for s in mod.body]
    units = []
    for text in tests:
        mod = compile(text, "tests.py", "exec", PyCF_ONLY_AST)
        units.append((text.strip().splitlines()[0] if text.strip() else "", called_tests(mod.body)))
    return [], None, units


def is_stub(fn) -> bool:
    """A function with nothing but a docstring, `pass` or `...` for a body: a signature for the program to fill in."""
    return all(type(s).__name__ == "Pass" or (type(s).__name__ == "Expr" and type(s.value).__name__ == "Constant"
                                              and (type(s.value.value) is str or s.value.value is Ellipsis)) for s in fn.body)


def segment(lines, stmt):
    first = lines[stmt.lineno - 1].strip() if stmt.lineno - 1 < len(lines) else ""
    return first[:120]


def run_statements(stmts, ns):
    import _ast

    exec(compile(_ast.Module(body=stmts, type_ignores=[]), "tests.py", "exec"), ns)


def describe(e):
    text = str(e)
    return f"{type(e).__name__}: {text}"[:300] if text else type(e).__name__


def drop_privileges(uid, gid):
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)  # also makes this process non-dumpable: its memory and fds stay private


def not_dumpable():
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0


def set_limits(limits):
    import resource

    table = {
        "cpu": resource.RLIMIT_CPU,
        "memory": resource.RLIMIT_AS,
        "processes": resource.RLIMIT_NPROC,
        "file_size": resource.RLIMIT_FSIZE,
        "open_files": resource.RLIMIT_NOFILE,
    }
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for key, value in limits.items():
        hard = value + 1 if key == "cpu" else value  # soft CPU limit sends SIGXCPU, the hard one kills
        resource.setrlimit(table[key], (value, hard))


def main():
    report_fd, uid, gid = int(sys.argv[-3]), sys.argv[-2], sys.argv[-1]
    first = marshal.loads(read_frame(0, limit=1 << 30))
    if uid != "-":
        drop_privileges(int(uid), int(gid))
    else:
        not_dumpable()
    set_limits(first["limits"])
    start = time.monotonic()
    deadline = start + first["timeout"]

    ns = {"__name__": "__main__"}  # tests under `if __name__ == "__main__":` run, as `python tests.py` runs them
    setup_error, stubs = None, set()
    try:
        code = compile(first["setup"], "setup.py", "exec", PyCF_ONLY_AST)
        stubs = {s.name for s in code.body if type(s).__name__ == "FunctionDef" and is_stub(s)}
        exec(compile(code, "setup.py", "exec"), ns)
    except Exception as e:
        setup_error = describe(e)

    c2p_r, c2p_w = os.pipe()
    p2c_r, p2c_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)  # frame 2 (tests, nonce) is still waiting in stdin: never read it here
        for fd in (null, report_fd, c2p_r, p2c_w):
            os.close(fd)
        try:
            try:
                deny_syscalls()
            except OSError as e:  # no filter, no program: its memory could outgrow the limits
                write_frame(c2p_w, lit(("load_error", f"sandbox: {e.strerror}")).encode())
                os._exit(1)
            serve(first["program"], p2c_r, c2p_w)
        finally:
            os._exit(1)
    os.close(c2p_w)
    os.close(p2c_r)
    del first

    second = marshal.loads(read_frame(0, limit=1 << 30))
    nonce = second["nonce"]

    def report(**record):
        record["nonce"] = nonce
        data = (repr(record) + "\n").encode()
        while data:
            data = data[os.write(report_fd, data) :]

    link = Link(pid, c2p_r, p2c_w, deadline)
    try:
        grade(link, ns, second, setup_error, report, stubs)
    finally:
        link.close()


def grade(link, ns, job, setup_error, report, stubs=frozenset()):
    if setup_error:
        report(done=True, status="bad_tests", detail=f"setup code failed: {setup_error}")
        return
    try:
        setup, param, units = units_of(job["tests"], job.get("entry_point"))
    except SyntaxError as e:
        report(done=True, status="bad_tests", detail=f"tests do not parse: {describe(e)}")
        return
    try:
        hello = link.receive()
    except Timeout:
        report(done=True, status="timeout", detail="the program did not finish loading in time")
        return
    except ProgramGone as e:
        report(done=True, status="program_error", detail=f"{e} before the tests ran")
        return
    if hello[0] != "ready" or len(hello) != 2 or type(hello[1]) is not list:
        detail = hello[1] if hello[0] == "load_error" and len(hello) == 2 and type(hello[1]) is str else "malformed"
        report(done=True, status="program_error", detail=detail[:500])
        return
    program_names = [n for n in hello[1] if type(n) is str and n.isidentifier()]

    entry = job.get("entry_point")
    proxies = {}
    # Names the trusted setup, the tests or the builtins define stay theirs (HumanEval's `poly`, a
    # test's own `is_close`, `abs`): a program defining the same name must not take over the tests.
    import builtins

    # The setup's stubs (a signature and docstring, as a code_prefix gives them) are the program's to define.
    trusted = (set(ns) - stubs) | set(vars(builtins)) | bound_names(setup) | bound_names(s for _, stmts in units for s in stmts)
    for name in program_names:
        if name not in trusted:
            proxies[name] = Remote(link, name)
    if entry:
        if entry not in program_names:
            report(done=True, status="program_error", detail=f"the program defines no function '{entry}'")
            return
        proxies[entry] = Remote(link, entry)
    if param:
        proxies[param] = proxies[entry]
    ns.update(proxies)
    try:
        run_statements(setup, ns)
    except Exception as e:
        report(done=True, status="bad_tests", detail=f"test setup failed: {describe(e)}")
        return

    expected = free_names([s for _, stmts in units for s in stmts], trusted) | {n for n in (entry, param) if n}
    tests = which_are_tests(units, expected)
    if not tests:
        report(done=True, status="bad_tests", detail="the tests hold no assert that calls the program")
        return
    report(tests=[units[i][0] for i in tests])
    status, detail, k = "passed", "", 0
    for i, (source, stmts) in enumerate(units):
        is_test = i in tests
        try:
            run_statements(stmts, ns)
            error = None
        except Timeout:
            error = "timeout"
        except ProgramGone as e:
            error = str(e)
        except Exception as e:
            error = describe(e)
        if is_test:
            report(test=k, ok=error is None, error=error)
            k += 1
        if error is not None and status == "passed":
            status = "failed"
            detail = f"{source}: {error}" if is_test else f"test setup `{source}` failed: {error}"
        if link.gone == "timeout":
            status, detail = "timeout", f"timed out in `{source}`"
            break
    report(done=True, status=status, detail=detail)


if __name__ == "__main__":
    main()
