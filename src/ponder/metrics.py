"""Where the figures of a run go: metrics.jsonl, samples.jsonl, the console, and the logging backends named by
`train.log_to`: TensorBoard (the default), Weights & Biases, MLflow. The JSONL files are always written; the
backends mirror them and are optional packages (`pip install 'ponder[wandb]'`, `'ponder[mlflow]'`)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from ponder.errors import UserError
from ponder.files import write_atomic

# train.log_to -> (the module it imports, what installs it)
LOG_BACKENDS = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install 'ponder[wandb]'"),
    "mlflow": ("mlflow", "pip install 'ponder[mlflow]'"),
}


def check_log_to(names, where: str = "train.log_to") -> None:
    """Unknown backend names are errors that list the known ones."""
    for name in names:
        if name not in LOG_BACKENDS:
            raise UserError(f"config {where}: unknown logging backend '{name}'; known: {', '.join(LOG_BACKENDS)}")


def require_backends(names, where: str = "train.log_to") -> None:
    """Each named backend's package must be installed: one line naming the extra to install otherwise."""
    check_log_to(names, where)
    for name in names:
        module, install = LOG_BACKENDS[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"{where} names {name} but the {module} package is not installed; "
                            f"{install} (or remove {name} from {where})")


DEFAULT_REFLECTION_WORDS = ("wait", "verify", "check", "mistake", "however", "recheck")


# scripts written without spaces between words (Han, kana, Thai, Lao, Myanmar, Khmer): no word boundary to ask for
UNSPACED_RANGES = "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
UNSPACED = re.compile(f"[{UNSPACED_RANGES}]")
SPACED_LETTER = f"[^\\W{UNSPACED_RANGES}]"  # a word character of a script with spaces between words


def reflection_pattern(words) -> re.Pattern:
    """A whole word each (`check` not in `checkpoint`), where words are spaced: `等等` counts in `我算错了等等重新算`
    and `wait` in `我wait了`, where \\b found no boundary (to regex every Han character is a word character)."""
    def one(w):
        left = "" if UNSPACED.match(w[:1]) else f"(?<!{SPACED_LETTER})"
        right = "" if UNSPACED.match(w[-1:]) else f"(?!{SPACED_LETTER})"
        return left + re.escape(w) + right

    return re.compile("|".join(one(w) for w in words), re.IGNORECASE)


def reflection_rate(texts: list[str], words=DEFAULT_REFLECTION_WORDS) -> float:
    """Share of texts with at least one reflection word (the R1 paper's 'wait', 'check', ...)."""
    if not texts:
        return 0.0
    pat = reflection_pattern(words)
    return sum(1 for t in texts if pat.search(t)) / len(texts)


def mean(values) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsWriter:
    """Appends one JSON line per step and mirrors it to the backends of `log_to`. Resumable: the lines of steps
    after `resume_step` are dropped (they will be recomputed), and W&B / MLflow continue the run they started.

    `log_to` and `config` (the resolved recipe, logged as the run's config) default to those of the run's
    config.yaml, which the trainers write before they open the writer; without one, TensorBoard only."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True, enabled: bool = True,
                 log_to: list[str] | None = None, config: dict | None = None):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.tb, self.backends = None, []
        if not enabled:  # ranks other than 0 of a data-parallel run write nothing
            return
        if config is None:
            config = _read_config(self.run_dir / "config.yaml")
        if log_to is None:
            log_to = (config.get("train") or {}).get("log_to")
            log_to = ["tensorboard"] if log_to is None else log_to
        if not tensorboard:
            log_to = [b for b in log_to if b != "tensorboard"]
        self.log_to = list(dict.fromkeys(log_to))
        require_backends([b for b in self.log_to if b != "tensorboard"])
        resumed = bool(resume_step)  # W&B and MLflow continue the run they started (their ids are in run_dir)
        for name in self.log_to:
            if name == "wandb":
                self.backends.append(_WandB(self.run_dir, config, resumed))
            elif name == "mlflow":
                self.backends.append(_MLflow(self.run_dir, config, resumed))
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.samples_path = self.run_dir / "samples.jsonl"
        if resume_step is not None:  # steps after the checkpoint will be recomputed; at 0, a start over: every step
            earlier = _truncate_after(self.metrics_path, resume_step or -1)
            _truncate_after(self.samples_path, resume_step or -1)
            if earlier and resume_step == 0 and enabled:  # (replaced without a word: a run whose checkpoints were
                from ponder.distributed import say_once  # deleted, started again under its name)

                say_once(f"ponder: {self.run_dir} holds an earlier attempt's {earlier} logged step"
                         f"{'s' * (earlier != 1)} and no checkpoint to resume from: starting over, they are replaced")
        self._metrics = self.metrics_path.open("a", encoding="utf-8")
        self._samples = self.samples_path.open("a", encoding="utf-8")
        if "tensorboard" in self.log_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # on resume, the events the stopped run logged past the checkpoint go (metrics.jsonl is cut there too);
                # a start over (resume_step 0) purges every earlier attempt's events
                purge = None if resume_step is None else resume_step + 1 if resume_step else 0
                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge)
            except ImportError:  # TensorBoard is optional; metrics.jsonl holds everything
                self.tb = None

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        scalars = {k: v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        self._each_backend(lambda b: b.log(step, scalars))

    def logged(self, step: int, prefix: str) -> bool:
        """Whether metrics.jsonl holds a figure named `prefix`... at `step` (a run stopped after writing its final
        evaluation's file and before logging it: the resume finds the file, and logs the figures from it). A rank
        that writes nothing has nothing to log."""
        if not self.enabled:
            return True
        self._metrics.flush()
        return any(row.get("step") == step and any(k.startswith(prefix) for k in row)
                   for row in read_jsonl(self.metrics_path))

    def samples(self, step: int, rows: list[dict]) -> None:
        if not self.enabled:
            return
        for r in rows:
            self._samples.write(json.dumps({"step": step, **r}, ensure_ascii=False) + "\n")
        self._samples.flush()
        if rows:
            self._each_backend(lambda b: b.samples(step, rows))

    def close(self) -> None:
        if not self.enabled:
            return
        self._metrics.close()
        self._samples.close()
        if self.tb is not None:
            self.tb.close()
        self._each_backend(lambda b: b.close())
        self.backends = []

    def _each_backend(self, call) -> None:
        """A logging service that fails mid-run (down, or refusing a name) loses its own figures, not the run."""
        for b in list(self.backends):
            try:
                call(b)
            except Exception as e:  # noqa: BLE001 (any service's error)
                self.backends.remove(b)
                print(f"ponder: {b.name}: {_first_line(e)}; it logs nothing more in this run (metrics.jsonl and "
                      "samples.jsonl keep every step)", file=sys.stderr)


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _mlflow_stores() -> str:
    """The stores this MLflow can open: mlflow-skinny (what the dev extra installs) has no database store."""
    import importlib.util

    file_store = "a file store needs MLFLOW_ALLOW_FILE_STORE=true"
    if importlib.util.find_spec("sqlalchemy") is None:
        return f"a database such as sqlite:///mlflow.db needs the full mlflow: pip install 'ponder[mlflow]'; {file_store}"
    return f"sqlite:///mlflow.db; {file_store}"


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _cell(v):
    """A samples-table cell: numbers and text as they are, anything else as JSON."""
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return json.dumps(v, ensure_ascii=False, default=str)


class _WandB:
    """Weights & Biases: one W&B run per ponder run (its id kept in RUN_DIR/wandb_id, so --resume continues
    it); the W&B files go under RUN_DIR/wandb unless WANDB_DIR says otherwise. WANDB_MODE=offline (or
    `wandb offline`) is honoured as W&B honours it: nothing leaves the machine until `wandb sync`.
    WANDB_PROJECT names the project (default: ponder). Samples go to the table `samples`."""

    name = "wandb"

    def __init__(self, run_dir: Path, config: dict, resumed: bool):
        import wandb

        self.wandb = wandb
        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else None
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or "ponder", name=run_dir.name, id=run_id, resume="allow",
                dir=os.environ.get("WANDB_DIR") or str(run_dir), config=config,
            )
        except Exception as e:  # no API key, no network, a bad entity, ...
            raise UserError(f"Weights & Biases could not start a run ({_first_line(e)}); log in with `wandb login`, "
                            "or log offline with WANDB_MODE=offline, or remove wandb from train.log_to") from None
        id_file.write_text(self.run.id + "\n")
        self.table = None
        self.columns: list[str] = []

    def log(self, step: int, scalars: dict) -> None:
        if scalars and step >= (self.run.step or 0):  # W&B drops steps before its current one
            self.run.log(scalars, step=step)

    def samples(self, step: int, rows: list[dict]) -> None:
        if step < (self.run.step or 0):
            return
        if self.table is None:
            self.columns = ["step"] + list(dict.fromkeys(k for r in rows for k in r))
            try:  # new rows only, each time (W&B >= 0.19); else the whole table again
                self.table = self.wandb.Table(columns=self.columns, log_mode="INCREMENTAL")
            except TypeError:
                self.table = self.wandb.Table(columns=self.columns)
        for r in rows:
            self.table.add_data(*[_cell(step if c == "step" else r.get(c)) for c in self.columns])
        self.run.log({"samples": self.table}, step=step)

    def close(self) -> None:
        self.run.finish()


_MLFLOW_BAD = re.compile(r"[^A-Za-z0-9_\-. :/]")


def mlflow_name(key: str) -> str:
    """MLflow allows letters, digits and _ - . space : / in metric names: pass@1 -> pass_at_1."""
    return _MLFLOW_BAD.sub("_", key.replace("@", "_at_"))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class _MLflow:
    """MLflow: one MLflow run per ponder run (its id kept in RUN_DIR/mlflow_id, so --resume continues it), in the
    tracking store MLflow itself picks (MLFLOW_TRACKING_URI; else its local default) and the experiment
    MLFLOW_EXPERIMENT_NAME (default: ponder). The recipe is logged as params (dotted keys); metric names
    are made MLflow-safe (pass@1 -> pass_at_1; in a file store reward/accuracy -> reward.accuracy); config.yaml
    and samples.jsonl are uploaded as artifacts at the end."""

    name = "mlflow"

    def __init__(self, run_dir: Path, config: dict, resumed: bool):
        import mlflow
        from mlflow.entities import Param

        self.run_dir = run_dir
        id_file = run_dir / "mlflow_id"
        try:
            self.client = mlflow.MlflowClient()
            run_id = id_file.read_text().strip() if resumed and id_file.is_file() else None
            if run_id:
                self.client.update_run(run_id, status="RUNNING")
            else:
                name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "ponder"
                exp = self.client.get_experiment_by_name(name)
                exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
                run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
                params = [Param(k, str(v)[:6000]) for k, v in _flatten(config).items()]
                for i in range(0, len(params), 100):  # MLflow takes at most 100 params a call
                    self.client.log_batch(run_id, params=params[i:i + 100])
        except Exception as e:
            raise UserError(f"MLflow could not start a run ({_first_line(e)}); set MLFLOW_TRACKING_URI to a tracking "
                            f"server or store ({_mlflow_stores()}), or remove mlflow from train.log_to") from None
        self.run_id = run_id
        id_file.write_text(run_id + "\n")
        # a file store keeps a metric as a file under its name's folders: `reward` and `reward/accuracy` cannot
        # both be, so there names take `.` for `/` (a server or database store keeps `/`, which its UI groups by)
        self.flat = urlparse(mlflow.get_tracking_uri()).scheme in ("", "file")

    def log(self, step: int, scalars: dict) -> None:
        from mlflow.entities import Metric

        if scalars:
            now = int(time.time() * 1000)
            names = {k: mlflow_name(k).replace("/", ".") if self.flat else mlflow_name(k) for k in scalars}
            self.client.log_batch(self.run_id, metrics=[Metric(names[k], float(v), now, step) for k, v in scalars.items()])

    def samples(self, step: int, rows: list[dict]) -> None:
        pass  # samples.jsonl goes up whole at the end

    def close(self) -> None:
        for name in ("config.yaml", "samples.jsonl"):
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        self.client.set_terminated(self.run_id)


def _truncate_after(path: Path, step: int) -> int:
    """Keeps the rows of `path` up to `step`; returns how many rows it left out."""
    if not path.is_file():
        return 0
    kept, rows = [], 0
    for line in _lines(path):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill (or a number of over 4,300 digits)
        # a line that is no row, or whose step is no number, is left out as read_jsonl leaves it (damaged bytes, a hand
        # edit: '[1, 2]' or {"step": null} was a traceback of --resume)
        rows += isinstance(row, dict)
        at = row.get("step", 0) if isinstance(row, dict) else None
        if isinstance(at, (int, float)) and not isinstance(at, bool) and at <= step:
            kept.append(line)
    write_atomic(path, "".join(l + "\n" for l in kept))
    return rows - len(kept)


def _lines(path: Path) -> list[str]:
    """A JSON-lines file's lines, split at newlines alone: str.splitlines also splits at U+2028, U+2029 and U+0085,
    which ensure_ascii=False leaves raw inside a completion's text (both halves failed to parse and were dropped)."""
    return [line for line in path.read_text(encoding="utf-8", errors="replace").split("\n") if line.strip()]


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl or samples.jsonl; a line that is not a JSON object (half a line a kill left,
    bytes damaged on disk) is left out, as the report and a resume read what the run wrote."""
    rows = []
    if path.is_file():
        for line in _lines(path):
            try:
                row = json.loads(line)
            except ValueError:  # (JSONDecodeError's base: a number of over 4,300 digits raised it)
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows
