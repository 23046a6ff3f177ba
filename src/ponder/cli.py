"""One entry point: ponder pretrain | sft | train | sample | distill | eval | report | push | config.

User mistakes (UserError) end in one line naming the culprit and the fix; no traceback. A stop by SIGTERM (a
cluster scheduler's, `kill PID`) ends as Ctrl-C does, in one line and exit status 143, after any checkpoint being
written is whole.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from ponder import stopping
from ponder.errors import TrainingError, UserError

# command -> module with add_parser(subparsers); modules that are not there yet are left out
COMMANDS = {
    "pretrain": "ponder.pretrain",
    "sft": "ponder.sft",
    "train": "ponder.train",
    "sample": "ponder.sample",
    "distill": "ponder.distill",
    "eval": "ponder.evaluate",
    "report": "ponder.report",
    "push": "ponder.push",
    "config": "ponder.show_config",
}


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose mistakes (a flag's value of the wrong kind, one missing) are one line as ponder's own
    are, not a usage block of a dozen lines above it (`--help` prints that). Subcommands' parsers are of this class
    too (argparse makes them of their parent's)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="ponder",
        description="Train language models to reason with reinforcement learning from verifiable rewards "
        "(GRPO, R1-Zero, cold start, rejection sampling, distillation) and evaluate them by pass@1 over k samples.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue
            raise
        if hasattr(mod, "add_parser"):
            mod.add_parser(sub)
    return parser


# how to go on after a stop, by command: only those that write as they go have --resume
CONTINUE = {
    "train": "--resume continues from the last checkpoint, if one was written (else run again)",
    "sft": "--resume continues from the last checkpoint, if one was written (else run again)",
    "distill": "--resume continues from the last stage or checkpoint written (else run again)",
    "sample": "--resume continues after the traces already written (else run again)",
    "pretrain": "run it again, with --overwrite if it began writing its output",
}


def stopped(command: str | None, by: str = "stopped by SIGTERM") -> str:
    return f"ponder: {by}; {CONTINUE.get(command or '', 'run it again')}"


STOPPED = stopped("train")
OTHER_STOPPED = "ponder: stopped: another rank stopped on an error (its message says why)"


def _short(path) -> str:
    text = str(path)
    return text if len(text) <= 80 else f"{text[:40]}...{text[-30:]}"


def main(argv: list[str] | None = None) -> int:
    try:
        with stopping.sigterm_stops():
            return _main(argv)
    except stopping.Terminated:  # before the command began (loading the commands' modules takes seconds)
        print(stopped(next((a for a in argv or sys.argv[1:] if not a.startswith("-")), None)), file=sys.stderr)
        return 143


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides after a flag (`ponder train R --resume train.steps=7`): argparse stops filling the
    # positional list at the first flag and leaves the rest over; they are overrides all the same
    rest = next((getattr(args, k) for k in ("overrides", "args") if isinstance(getattr(args, k, None), list)), None)
    if extra and rest is not None and all("=" in x and not x.startswith("-") for x in extra):
        rest += extra
    elif extra:
        parser.parse_args(argv)  # argparse's own one-line error for what is really unknown
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from ponder import distributed

    why = "error"
    try:
        if distributed.launched() > 1 and args.command not in ("train", "sft"):  # sft says so itself, naming train
            raise UserError(f"ponder {args.command} runs one process, and torchrun started {distributed.launched()}; "
                            "start it without torchrun (`ponder train` is the command that runs on several)")
        if args.command in ("train", "sft"):  # RECIPE may be the run's directory (to resume: told to add --resume)
            from ponder.resume import recipe_of

            args.recipe, args.overrides = recipe_of(args.command, args.recipe, args.overrides, args.resume)
        args.func(args)
        distributed.teardown()  # every rank done: leave together (its barrier fails if another rank stopped on an error)
    except UserError as e:
        stopping.leaving()
        distributed.say_once(f"ponder: error: {e}")
        return 2
    except TrainingError as e:
        stopping.leaving()
        distributed.say_once(f"ponder: training stopped: {e}")
        return 1
    except OSError as e:
        if e.errno not in FILE_SYSTEM:
            raise
        stopping.leaving()  # the file system's refusal, wherever the file was written: its words, not a traceback
        distributed.say_once(f"ponder: error: {FILE_SYSTEM[e.errno].format(_short(e.filename or 'a file'))}")
        return 2
    except stopping.Terminated:
        if distributed.another_rank_stopped() == "error":  # torchrun's SIGTERM once that rank had exited
            distributed.say_once(OTHER_STOPPED)
            return 1
        why = "sigterm"
        distributed.say_once(stopped(args.command))
        return 143  # 128 + SIGTERM, as a shell reports a process that SIGTERM ended
    except KeyboardInterrupt:
        stopping.leaving()
        print(stopped(args.command, "interrupted"), file=sys.stderr)
        return 130
    except Exception:
        stopping.leaving()
        other = distributed.another_rank_stopped()
        if other is None:
            raise
        # the collective this rank waited in failed because that rank left: a scheduler's SIGTERM to every rank, or an
        # error there, whose own line says why
        if other == "sigterm":
            why = "sigterm"  # stopped as that rank was, not by an error of its own
            distributed.say_once(stopped(args.command))
            return 143
        distributed.say_once(OTHER_STOPPED)
        return 1
    finally:  # after an error or a stop: tell the other ranks why and leave (nothing to do after a clean end)
        stopping.leaving()
        distributed.teardown(clean=False, why=why)
    return 0


# what the file system refused, and the fix (a file of the run made immutable, a full disk, a run name past 255 bytes)
FILE_SYSTEM = {
    errno.ENAMETOOLONG: "a file name is too long for this file system ({}); choose a shorter name or output path",
    errno.EACCES: "{} cannot be written (permission denied); fix its permissions, or choose another output path",
    errno.EPERM: "{} cannot be written (operation not permitted: immutable?); fix it, or choose another output path",
    errno.EROFS: "{} is on a read-only file system; choose another output path",
    errno.ENOSPC: "no space left on the device to write {}; free some, or choose another output path",
    errno.EDQUOT: "the disk quota is spent writing {}; free some, or choose another output path",
}


if __name__ == "__main__":
    sys.exit(main())
