"""Functions of the user's own, named in a recipe as `module:function` or `path/to/file.py:function`.

- `my_pkg.rewards:fn`: an importable module (installed, or found from the working directory).
- `path/to/file.py:fn`: a Python file; a relative path is taken from the working directory, like every
  other path in a recipe (data files, models), so a recipe and its overrides mean the same thing.

Used by custom rewards (ponder.rewards) and custom tasks (ponder.tasks).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import traceback
from pathlib import Path
from typing import Callable

from ponder.errors import UserError


def raised(what: str, ref: str, e: Exception) -> str:
    """One line for an exception raised inside a function of the user's own: what, and where (its last frame)."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{what} '{ref}' raised {type(e).__name__}{where}: {e}"


def is_reference(name: str) -> bool:
    """True for `module:fn` and `file.py:fn`; built-in names never hold a colon."""
    return ":" in str(name)


def load_function(ref: str, what: str) -> Callable:
    """The callable `ref` names; `what` ("reward", "task") words the errors."""
    target, _, attr = str(ref).rpartition(":")
    if not target or not attr.isidentifier():
        raise UserError(f"{what} '{ref}': write it as my_pkg.module:function or path/to/file.py:function")
    module = _load_file(ref, target, what) if target.endswith(".py") or "/" in target else _import(ref, target, what)
    fn = getattr(module, attr, None)
    if fn is None:
        have = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_") and getattr(v, "__module__", None) == module.__name__)
        raise UserError(f"{what} '{ref}': {target} has no '{attr}'" + (f"; it defines: {', '.join(have)}" if have else ""))
    if not callable(fn):
        raise UserError(f"{what} '{ref}': '{attr}' in {target} is a {type(fn).__name__}, not a function")
    return fn


def import_failed(what: str, ref: str, e: BaseException, source: str | None = None) -> UserError:
    """One line for a user's module that fails as it is imported (a misspelt import, a name error at its top level):
    the error and the line of the user's file that raised it (`source`, its path, where known), else the last one."""
    frames = traceback.extract_tb(e.__traceback__)
    mine = [f for f in frames if source is not None and Path(f.filename).resolve() == Path(source).resolve()]
    frame = (mine or frames or [None])[-1]
    where = f" at {Path(frame.filename).name}:{frame.lineno}" if frame is not None else ""
    return UserError(f"{what} '{ref}': importing it raised {type(e).__name__}{where}: {e}; fix the module (or install "
                     "what it imports)")


def _import(ref: str, module: str, what: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if not _is_part_of(e.name, module):  # the user's module imports something missing
            raise import_failed(what, ref, e) from None
    except Exception as e:
        raise import_failed(what, ref, e) from None
    cwd = str(Path.cwd())
    if cwd not in sys.path:  # `ponder` run as a script does not see the working directory
        sys.path.insert(0, cwd)
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError as e:
            if not _is_part_of(e.name, module):
                raise import_failed(what, ref, e) from None
        except Exception as e:
            raise import_failed(what, ref, e) from None
    raise UserError(f"{what} '{ref}': no module '{module}' (not installed, nor under the working directory {cwd})")


def _is_part_of(missing: str | None, module: str) -> bool:
    return bool(missing) and (module == missing or module.startswith(missing + "."))


def _load_file(ref: str, target: str, what: str):
    path = Path(target).expanduser()
    if not path.is_file():
        raise UserError(f"{what} '{ref}': file '{target}' not found (relative paths are from the working directory, {Path.cwd()})")
    path = path.resolve()
    name = f"ponder_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: dataclasses and pickling look the module up
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:  # the file's own line and message say all of it
        del sys.modules[name]
        raise UserError(f"{what} '{ref}': {target}:{e.lineno}: {e.msg}; fix the file") from None
    except Exception as e:
        del sys.modules[name]
        raise import_failed(what, ref, e, str(path)) from None
    except BaseException:  # KeyboardInterrupt, SystemExit: theirs to end the run
        del sys.modules[name]
        raise
    return module
