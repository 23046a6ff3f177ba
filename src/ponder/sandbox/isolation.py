"""The bubblewrap command line that isolates one run, and the check that bubblewrap works here.

What the sandbox sees: the system's /usr (and the /lib, /bin links or directories next to it) and the
Python interpreter's own prefix, all read-only; a fresh /proc for its own PID namespace, a minimal
read-only /dev (its device nodes work; no file can be written there, /dev/shm included), and a private,
size-capped tmpfs at /tmp that is also its working directory. No home directory, no /etc, no project
files, no virtual environment, no network (a fresh network namespace), an empty environment, its own
session (no terminal to inject keys into), and it dies with its parent.

Who it runs as: started by root, bubblewrap needs no user namespace and the grader drops to a
dedicated unprivileged uid (one per concurrent run, so process limits and signals stay per run).
Started by an ordinary user, bubblewrap maps that user to uid 65534 in a new user namespace.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys

from ponder.errors import UserError

INSTALL_HINT = "install it with `apt-get install bubblewrap` (or `make sysdeps`), or set `unsafe: true` to run model code without isolation"


def find_bwrap() -> str:
    path = shutil.which("bwrap")
    if path is None:
        raise UserError(f"bubblewrap (bwrap) is not installed but is needed to run model-written code; {INSTALL_HINT}")
    return path


@functools.lru_cache(maxsize=1)
def interpreter() -> tuple[str, str]:
    """(executable, prefix) of the base Python: a virtual environment's packages stay outside."""
    prefix = os.path.realpath(sys.base_prefix)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (getattr(sys, "_base_executable", ""), sys.executable, os.path.join(prefix, "bin", version)):
        exe = os.path.realpath(candidate) if candidate else ""
        if exe and os.access(exe, os.X_OK) and (exe.startswith(prefix + os.sep) or exe.startswith("/usr/")):
            return exe, prefix
    raise UserError(f"cannot find the Python interpreter under {prefix} to run sandboxed code; run ponder from a standard Python installation")


def _ancestors(path: str) -> list[str]:
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def bwrap_argv(bwrap: str, scratch_bytes: int, as_root: bool) -> list[str]:
    """Everything before `--` and the command."""
    exe, prefix = interpreter()
    argv = [
        bwrap,
        "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--die-with-parent", "--new-session",
        "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp", "--setenv", "LANG", "C.UTF-8",
        "--ro-bind", "/usr", "/usr",
    ]  # fmt: skip
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    if not prefix.startswith("/usr/"):
        for parent in _ancestors(prefix):
            if parent not in ("/usr",):
                argv += ["--perms", "0755", "--dir", parent]  # reachable by the sandbox user, empty otherwise
        argv += ["--ro-bind", prefix, prefix]
    argv += [
        # /dev is a tmpfs that bubblewrap leaves writable (by the sandbox user, when run by an ordinary user) and
        # uncapped: /dev/shm would hold host memory outside RLIMIT_AS and the scratch cap. Read-only once made;
        # its device nodes (/dev/null, /dev/urandom) are mounts of their own and work as before.
        "--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
        "--perms", "1777", "--size", str(scratch_bytes), "--tmpfs", "/tmp", "--chdir", "/tmp",
        "--remount-ro", "/",
    ]  # fmt: skip
    if as_root:
        # Only what the grader needs to switch to its unprivileged uid; it gives these up at once.
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user", "--uid", "65534", "--gid", "65534"]
    return argv
