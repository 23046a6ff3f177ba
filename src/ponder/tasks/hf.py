"""Tasks from Hugging Face `datasets`: a Hub dataset, a local Parquet / Arrow / JSON(L) / CSV file, a
folder of such files, or a `save_to_disk` folder. Needs the `hf` extra (`pip install 'ponder[hf]'`).

    data:
      tasks:
        - name: hf
          path: openai/gsm8k          # a Hub id, a file or a folder
          split: train
          n: 2000                     # rows taken (after the filter); unset: every row
          options: {config: main, prompt: question, answer: answer, answer_format: gsm8k}

Options:
- `prompt`: the column holding the question (default: the first of prompt, question, problem present), or
  a template over columns, e.g. "{problem}\\n\\nGive the answer as a fraction."; a column of chat
  messages is taken as it is. In a template, a free-standing `{column}` is the row's value and other braces
  are text: a group right after a LaTeX command, `^`, `_` or another group (`\\frac{a}{b}`, `\\text{cm}`,
  `x^{n}`, `\\boxed{answer}`), and braces around anything but a name (`\\boxed{}`, `{1, 2}`). A free-standing name
  that is no column is an error (a misspelt column), as are `{ column }`, `{column!r}` or `{column:>5}` (only a
  plain `{column}` is filled), the answer's column and a template that fills no column; write `{{x}}` for a
  literal `{x}`, as in str.format.
- `answer`: the column holding the answer (default: answer). A null or empty answer is an error that
  names the row.
- `answer_format`: how the final answer is found in that column (ponder.tasks.math_formats): `plain` (the
  column is the answer; default), `gsm8k` (after `####`), `boxed` (the last \\boxed{}, as in MATH solutions).
  With another format than plain, the column's full text is also kept, as `solution` when the column
  is `answer`.
- `metadata`: the columns kept on each example beside prompt and answer (rewards see them as columns);
  default: all of them.
- `filter`: keep only rows whose columns hold these values, e.g. `{level: Level 5}` or
  `{type: [Algebra, Geometry]}`.
- `config`, `revision`: a Hub dataset's configuration (e.g. `main` for openai/gsm8k) and revision.
- `streaming`: read a Hub dataset while downloading it, storing nothing (default false: downloaded once
  into the Hugging Face cache, then memory-mapped).

What is held in memory: local data files are read in batches straight from the file (streamed, never
converted or copied); `save_to_disk` folders and downloaded Hub datasets are memory-mapped Arrow. Only the
rows taken become examples, so `n` bounds memory; with `n` unset every row becomes an example (the
trainer keeps its examples in memory). A single file has no splits: it is read whatever `split` says.
Answers are checked by mathematical equivalence, like the `jsonl` task.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

from ponder.errors import UserError
from ponder.tasks import Task, answer_text, path_fix, register
from ponder.tasks.jsonl import empty_value, no_value
from ponder.tasks.math_formats import FINAL_ANSWER, PROMPT_FIELDS

BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes


def _datasets():
    try:
        import datasets
    except ModuleNotFoundError:
        raise UserError("task 'hf' needs the datasets library: pip install 'ponder[hf]' (or pip install datasets)") from None
    datasets.logging.disable_progress_bar()
    return datasets


@contextmanager
def reading(path: str):
    """What datasets, pyarrow or pandas raise on a file or folder they cannot read, as one line naming it."""
    try:
        yield
    except StopIteration:  # (an empty JSON lines file)
        raise UserError(f"task 'hf': {path} holds no rows") from None
    except (ValueError, OSError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"task 'hf': {path} could not be read ({type(e).__name__}: {first}); fix the data, or give "
                        "another path") from None


def open_dataset(path: str, split: str, config=None, revision=None, streaming=False):
    """The split of a dataset as a memory-mapped `Dataset` or a streamed `IterableDataset`."""
    datasets = _datasets()
    local = Path(path).expanduser()
    if local.is_dir() and any((local / m).is_file() for m in SAVED_MARKERS):
        with reading(path):
            ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise UserError(f"task 'hf': {path} has no split '{split}'; its splits: {', '.join(ds)}")
            ds = ds[split]
        return ds
    if local.is_file():
        builder = BUILDERS.get(local.suffix.lower())
        if builder is None:
            raise UserError(f"task 'hf': cannot read '{path}'; give a {', '.join(BUILDERS)} file, a folder or a Hub id")
        with reading(path):
            return datasets.load_dataset(builder, data_files=str(local), split="train", streaming=True)
    if local.is_dir():  # a dataset repository's files (hf download --local-dir): its configs as on the Hub
        with reading(path):
            found = datasets.load_dataset(str(local), config, revision=revision, streaming=True)
        if split not in found:
            raise UserError(f"task 'hf': {path} has no split '{split}'; its splits: {', '.join(found)}")
        return found[split]
    if local.suffix.lower() in BUILDERS or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise UserError(f"task 'hf': '{path}' not found (relative paths are from the working directory, {Path.cwd()})")
    try:  # a Hub id: downloaded into the Hugging Face cache (HF_HUB_OFFLINE=1 uses the cache alone)
        return datasets.load_dataset(path, config, split=split, revision=revision, streaming=streaming)
    except (ValueError, FileNotFoundError, ConnectionError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"task 'hf': '{path}' is no local file or folder, and the Hub could not give it "
                        f"({first}); check the id, config '{config}' and split '{split}', or the network") from None


def _check_kinds(prompt, answer, metadata, filter) -> None:
    """The column options' kinds, one line each (a number for `prompt`, a list for `filter` or `answer`: TypeError or
    AttributeError tracebacks from the rows)."""
    scalar = (str, int, float, bool)
    if prompt is not None and not isinstance(prompt, str):
        raise UserError(f"task 'hf': prompt must be a column name or a template with {{column}} fields, got {prompt!r}")
    if not isinstance(answer, str):
        raise UserError(f"task 'hf': answer must be a column name, got {answer!r}")
    if metadata is not None and not (isinstance(metadata, list) and all(isinstance(m, str) for m in metadata)):
        raise UserError(f"task 'hf': metadata must be a list of column names, got {metadata!r}")
    if filter is not None and not (isinstance(filter, dict) and all(
            isinstance(v, scalar) or (isinstance(v, list) and all(isinstance(x, scalar) for x in v)) for v in filter.values())):
        raise UserError(f"task 'hf': filter must map columns to a value or a list of values, e.g. {{level: [1, 2]}}; "
                        f"got {filter!r}")


@register
class HfDataset(Task):
    """Rows of any `datasets` source, with a column mapping; answers checked by mathematical equivalence."""

    name = "hf"

    def load(self, split="train", n=None, seed=0, path=None, prompt=None, answer="answer", answer_format="plain",
             metadata=None, filter=None, config=None, revision=None, streaming=False):
        if path is None:
            raise UserError(f"task 'hf' needs a path: {path_fix('hf', 'data.parquet')} (a file, a folder or a Hub id)")
        if answer_format not in FINAL_ANSWER:
            raise UserError(f"task 'hf': unknown answer_format '{answer_format}'; choose one of: {', '.join(FINAL_ANSWER)}")
        metadata = [metadata] if isinstance(metadata, str) else metadata  # one column by name (it was read letter by letter)
        _check_kinds(prompt, answer, metadata, filter)
        if not isinstance(streaming, bool):  # bool("no") is True
            raise UserError(f"task 'hf': streaming must be true or false, got {streaming!r}")
        filters = {k: set(v) if isinstance(v, list) else {v} for k, v in (filter or {}).items()}
        ds = open_dataset(str(path), split, config, revision, bool(streaming))
        final = FINAL_ANSWER[answer_format]
        raw_as = "solution" if answer == "answer" else answer
        plan = None  # what the columns decide (the prompt's column or template fields): known up front, or (a streamed
        if ds.column_names:  # CSV or JSON file) from the first rows
            plan = _Plan(path, prompt, answer, filters, metadata, list(ds.column_names))
            if metadata is not None:  # read only the columns used
                ds = ds.select_columns(plan.used)
        out, i = [], 0
        with reading(str(path)):  # a streamed file is read here, batch by batch
            for batch in ds.iter(batch_size=512):
                plan = plan or _Plan(path, prompt, answer, filters, metadata, list(batch))
                for values in zip(*batch.values()):
                    i += 1
                    row = dict(zip(batch, values))
                    if any(row[k] not in allowed for k, allowed in filters.items()):
                        continue
                    if empty_value(row[answer]):
                        raise UserError(f"{path}: row {i} has {no_value(row[answer])} '{answer}' "
                                        "column; every row needs an answer (fix the data, or filter the row out)")
                    gold = final(row[answer])
                    if empty_value(gold):
                        raise UserError(f"{path}: row {i}: no final answer in column '{answer}' for answer_format "
                                        f"'{answer_format}'")
                    missing = next((c for c in plan.fields if empty_value(row[c]) and not isinstance(row[c], str)),
                                   None) if plan.template else None  # (an empty text: a column left blank on purpose)
                    if missing:  # its text would be "None" or "nan" in the prompt
                        raise UserError(f"{path}: row {i} has {no_value(row[missing])} '{missing}' column, which the "
                                        "prompt template fills (fix the data, or filter the row out)")
                    text = plan.prompt_of(row)
                    if empty_value(text):
                        raise UserError(f"{path}: row {i} has {no_value(text)} prompt ('{plan.prompt}')")
                    example = {k: row[k] for k in plan.keep}
                    if answer_format != "plain" and raw_as not in example:
                        example[raw_as] = row[answer]
                    out.append({**example, "prompt": text, "answer": answer_text(gold).strip(), "task": self.name})
                    if n and len(out) >= n:
                        return out
        return out


# What str.format would read as a field: a name, with spaces around it or a conversion, format spec, attribute or index
# after it (no spaces inside those)
_FIELD = re.compile(r"\s*([A-Za-z_]\w*)\s*(?:[!:.\[]\S*)?")
# One brace group of a prompt template (no brace inside), or `{{` / `}}`, the braces of str.format's escapes.
_GROUP = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
# What makes the brace group after it a LaTeX argument, so text whatever it names: a command (`\boxed{answer}`,
# `\text{cm}`, `\sqrt[3]{x}`), a super- or subscript (`x^{n}`) or another group (the `{b}` of `\frac{a}{b}`). Not
# `\n`, `\t`, `\r`: a template in single-quoted YAML keeps "\n{hint}" as written, and {hint} is meant as a column.
_LATEX_BEFORE = re.compile(r"(?:\\(?![ntr](?![A-Za-z]))[A-Za-z]+\*?(?:\[[^\]{}]*\])?|[\^_}])\Z")


class _Plan:
    """What a dataset's columns decide: the prompt's column or template, the columns read and the ones kept."""

    def __init__(self, path, prompt, answer, filters, metadata, columns: list[str]):
        self.prompt = prompt or next((c for c in PROMPT_FIELDS if c in columns), PROMPT_FIELDS[0])
        self.template = "{" in self.prompt
        self.pieces = _parse_template(path, self.prompt, answer, columns) if self.template else []
        self.fields = [col for _, col in self.pieces if col] if self.template else [self.prompt]
        self.used = list(dict.fromkeys([*self.fields, answer, *filters, *(metadata or [])]))
        _check_columns(path, self.used, columns)
        self.keep = columns if metadata is None else list(metadata)

    def prompt_of(self, row: dict):
        if not self.template:
            return row[self.prompt]
        return "".join(text + (str(row[col]) if col else "") for text, col in self.pieces)


def _parse_template(path, template: str, answer: str, columns: list[str]) -> list[tuple[str, str | None]]:
    """A prompt template as (text, column or None) pieces. Only a free-standing `{column}` is filled; a brace group
    after a LaTeX command, `^`, `_` or another group is text, and so are braces around anything but a name. What
    looks meant as a column and is not filled is refused, as it would reach the model as the same text in every
    row: a name that is no column (misspelt), a column with spaces or a format spec (`{ x }`, `{x!r}`, `{x:>5}`),
    the answer's column (it gives the answer away), a template that fills no column at all."""
    pieces, text, at, filled_end = [], "", 0, -1
    for m in _GROUP.finditer(template):
        text, at, inner = text + template[at:m.start()], m.end(), m[1]
        latex = _LATEX_BEFORE.search(template, 0, m.start())
        if latex and latex.start() == filled_end - 1:  # after a filled {column}'s brace: "{question}{hint}" fills both
            latex = None
        if inner is None or latex:  # {{, }} or a LaTeX argument
            text += m[0][0] if inner is None else m[0]
            continue
        meant = _FIELD.fullmatch(inner)  # a name, perhaps with spaces or a str.format spec: meant as a column
        if meant is None:  # {1, 2}, {}, {answer: <number>}: text
            text += m[0]
            continue
        head = meant[1]  # the column str.format would have read
        if head == answer and answer in columns:
            raise UserError(f"task 'hf': the prompt template puts the answer column '{{{answer}}}' in the prompt, giving the "
                            f"answer away; for braces in the text write {{{{{answer}}}}}")
        if inner in columns:
            pieces.append((text, inner))
            text, filled_end = "", m.end()
        elif head in columns:
            how = "no spaces inside" if inner.strip() == head else "no conversion or format spec such as !r or :>5"
            raise UserError(f"task 'hf': the prompt template's '{m[0]}' fills nothing, as only a plain {{column}} is filled: "
                            f"write {{{head}}} ({how}), or {{{m[0]}}} for braces in the text")
        else:
            raise UserError(f"task 'hf': the prompt template names '{m[0]}', but {path} has no column '{head}' (its "
                            f"columns: {', '.join(columns)}); for braces in the text write {{{m[0]}}}")
    pieces.append((text + template[at:], None))
    if not any(col for _, col in pieces):
        shown = template.replace("\n", "\\n")  # one line
        raise UserError(f"task 'hf': the prompt template '{shown}' fills no column, so every row would get the same "
                        f"prompt; write a free-standing {{column}} (after a LaTeX command, ^, _ or }} braces are text); "
                        f"the columns of {path}: {', '.join(columns)}")
    return pieces


def _check_columns(path, used: list[str], columns: list[str]) -> None:
    for col in used:
        if col not in columns:
            raise UserError(f"task 'hf': {path} has no column '{col}'; its columns: {', '.join(columns)}")
