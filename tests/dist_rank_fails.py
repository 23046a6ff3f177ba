"""Run under torchrun by tests/test_distributed.py: `ponder train` (argv[2:]) in which rank 0 alone fails, at
argv[1]: `report` (a UserError while rank 0 writes the report; the others wait in the last barrier) or `checkpoint`
(the disk full while rank 0 writes the Hugging Face export; the others wait in the checkpoint's barrier)."""

import os
import sys

from ponder.errors import UserError


def full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device", "model.safetensors")


def unwritable(run_dir):
    raise UserError(f"{run_dir}/report.html is not writable")


if __name__ == "__main__":
    where, args = sys.argv[1], sys.argv[2:]
    if os.environ["RANK"] == "0":
        if where == "report":
            import ponder.report

            ponder.report.write_report = unwritable
        else:
            import ponder.models

            ponder.models.save = full_disk
    from ponder.cli import main

    sys.exit(main(args))
