"""train.log_to: W&B (offline) and MLflow get the metrics, the run's config and the samples; unknown or missing
backends end in one line."""

import json
import re
import struct
import sys
import time
from importlib.util import find_spec

import pytest

from ponder.cli import main

SMOKE = "recipes/smoke-first-digit.yaml"


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # pytest owns stdout
    monkeypatch.setenv("WANDB_X_DISABLE_STATS", "true")  # no system-metrics sampler on two cores
    (tmp_path / "wandb-dir").mkdir()
    return tmp_path / "wandb-dir"


def _wandb_records(run_file):
    """The records of an offline run's .wandb file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf, out = run_file.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if length == 0 and kind == 0:
            pos += left - 7
            continue
        buf += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # full, last
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def _offline_run(wandb_dir):
    runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert runs, list(wandb_dir.rglob("*"))
    history, config, ids = {}, {}, []
    for run in runs:
        for _ in range(300):  # W&B's own process may still be writing the file when finish() returns
            records = _wandb_records(next(run.glob("run-*.wandb")))
            if any(r.WhichOneof("record_type") == "exit" for r in records):
                break
            time.sleep(0.1)
        for r in records:
            kind = r.WhichOneof("record_type")
            if kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                history[row["_step"]] = row
            elif kind == "run":
                ids.append(r.run.run_id)
                config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in r.config.update})
    return ids, history, config


def test_wandb_offline_gets_metrics_config_and_samples(tmp_path, wandb_offline):
    assert main(["train", SMOKE, f"output_dir={tmp_path}", "name=wb", "train.steps=2", "train.log_samples=2",
                 "rollout.prompts_per_step=4", "rollout.group_size=4",
                 "train.log_to=[tensorboard, wandb]"]) == 0
    run_dir = tmp_path / "wb"
    assert (run_dir / "tensorboard").is_dir()
    ids, history, config = _offline_run(wandb_offline)
    assert ids == [(run_dir / "wandb_id").read_text().strip()]
    logged = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(history) == [1, 2]
    for row in logged:
        assert history[row["step"]]["reward"] == pytest.approx(row["reward"])
    assert config["optim"]["lr"] == 3e-3 and config["train"]["log_to"] == ["tensorboard", "wandb"]
    assert history[2]["samples/_type"] in ("incremental-table-file", "table-file")
    tables = sorted(wandb_offline.glob("wandb/offline-run-*/files/media/table/samples_*.table.json"))
    assert tables
    table = json.loads(tables[0].read_text())
    assert table["columns"][:4] == ["step", "prompt", "answer", "completion"] and len(table["data"]) == 2


def test_wandb_resume_continues_the_same_run(tmp_path, wandb_offline):
    from ponder.metrics import MetricsWriter

    for resume_step, steps in ((0, (1, 2)), (1, (2, 3))):  # killed after step 2, resumed from checkpoint step-1
        w = MetricsWriter(tmp_path, resume_step=resume_step, log_to=["wandb"], config={"seed": 0})
        for step in steps:
            w.log(step, {"reward": step / 10})
        w.close()
    ids, history, _ = _offline_run(wandb_offline)
    assert len(ids) == 2 and set(ids) == {(tmp_path / "wandb_id").read_text().strip()}
    assert history[3]["reward"] == pytest.approx(0.3)


def test_sft_logs_its_own_config_to_wandb(tmp_path, wandb_offline):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1", "completion": f"<answer>{i + 1}</answer>"}) + "\n" for i in range(4)))
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"name: s\noutput_dir: {tmp_path}\nmodel: {{path: tiny-random}}\ndata: {{files: [{data}]}}\n"
                      "train: {steps: 1, batch_size: 2, log_samples: 0, log_to: [wandb]}\n")
    assert main(["sft", str(recipe)]) == 0
    _, history, config = _offline_run(wandb_offline)
    assert config["data"]["files"] == [str(data)] and config["train"]["batch_size"] == 2
    assert history[1]["loss"] > 0
    assert not (tmp_path / "s" / "tensorboard").exists()  # log_to without tensorboard


def test_unknown_backend_lists_the_known_ones(tmp_path, error_line):
    line = error_line("train", SMOKE, f"output_dir={tmp_path}", "train.log_to=[tensorboard, wandbb]")
    assert line == "ponder: error: config train.log_to: unknown logging backend 'wandbb'; known: tensorboard, wandb, mlflow"


def test_missing_package_names_the_extra(tmp_path, monkeypatch, error_line):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    line = error_line("train", SMOKE, f"output_dir={tmp_path}", "train.log_to=[wandb]")
    assert line == ("ponder: error: train.log_to names wandb but the wandb package is not installed; "
                    "pip install 'ponder[wandb]' (or remove wandb from train.log_to)")
    assert not (tmp_path / "smoke-first-digit").exists()  # refused before anything is loaded or written


def test_mlflow_gets_params_metrics_and_samples_and_resume_continues_the_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from ponder.metrics import MetricsWriter

    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = {"optim": {"lr": 0.001}, "train": {"log_to": ["mlflow"]}}
    w = MetricsWriter(run_dir, resume_step=0, config=cfg)
    w.log(1, {"reward": 0.5, "reward/accuracy": 0.5, "eval/arithmetic/test/pass@1": 0.25, "note": "text"})
    w.samples(1, [{"prompt": "1+1", "completion": "2"}])
    w.close()
    w = MetricsWriter(run_dir, resume_step=1, config=cfg)
    w.log(2, {"reward": 0.75})
    w.close()
    (run,) = [p for p in store.glob("*/*") if (p / "meta.yaml").is_file()]
    assert run.name == (run_dir / "mlflow_id").read_text().strip()
    assert (run / "params" / "optim.lr").read_text() == "0.001"
    assert [l.split()[1:] for l in (run / "metrics" / "reward").read_text().splitlines()] == [["0.5", "1"], ["0.75", "2"]]
    # a file store keeps a metric as a file: `reward` and `reward/accuracy` cannot both be (NotADirectoryError)
    assert (run / "metrics" / "reward.accuracy").is_file()
    assert (run / "metrics" / "eval.arithmetic.test.pass_at_1").is_file()
    assert "1+1" in (run / "artifacts" / "samples.jsonl").read_text()


def test_a_database_store_without_its_package_names_the_full_mlflow(tmp_path, monkeypatch):
    """mlflow-skinny (the dev extra's) opens no database store: the line recommended sqlite:///mlflow.db, the URI
    that had just failed."""
    pytest.importorskip("mlflow")
    from ponder.errors import UserError
    from ponder.metrics import MetricsWriter

    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # as in mlflow-skinny
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "sqlalchemy" else find_spec(name, *a))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(UserError) as e:
        MetricsWriter(tmp_path, resume_step=0, config={"train": {"log_to": ["mlflow"]}})
    assert str(e.value).startswith("MLflow could not start a run (")
    assert str(e.value).endswith(
        "; set MLFLOW_TRACKING_URI to a tracking server or store (a database such as sqlite:///mlflow.db needs the full "
        "mlflow: pip install 'ponder[mlflow]'; a file store needs MLFLOW_ALLOW_FILE_STORE=true), or remove mlflow from "
        "train.log_to")


def test_a_logging_service_that_fails_mid_run_stops_logging_not_the_run(tmp_path, capsys):
    from ponder.metrics import MetricsWriter

    class Down:
        name = "mlflow"

        def log(self, step, scalars):
            raise ConnectionError("connection refused\nretries exhausted")

    w = MetricsWriter(tmp_path, tensorboard=False)
    w.backends.append(Down())
    w.log(1, {"reward": 0.5})
    w.log(2, {"reward": 0.75})
    w.close()
    assert capsys.readouterr().err == ("ponder: mlflow: connection refused; it logs nothing more in this run "
                                       "(metrics.jsonl and samples.jsonl keep every step)\n")
    assert [json.loads(line)["reward"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0.5, 0.75]


def test_tensorboard_drops_what_a_stopped_run_logged_past_its_checkpoint(tmp_path):
    """metrics.jsonl is cut back to the checkpoint on resume; TensorBoard kept the stopped run's later events beside
    the recomputed ones (steps 3-5 twice, the old values first)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ponder.metrics import MetricsWriter

    first = MetricsWriter(tmp_path, log_to=["tensorboard"])
    for step in range(1, 6):
        first.log(step, {"reward": float(step)})
    first.close()
    # as the stopped run was written a minute before: TensorBoard reads event files in the order of their names, which
    # begin with the second they were opened in and end with a counter of writers in the process, compared as text. Two
    # writers of one test in one second sorted the resumed one first once that counter passed 9 (suite order decides)
    for path in (tmp_path / "tensorboard").rglob("events.out.tfevents.*"):
        m = re.fullmatch(r"(events\.out\.tfevents\.)(\d+)(\..*)", path.name)
        path.rename(path.with_name(f"{m[1]}{int(m[2]) - 60:010d}{m[3]}"))
    resumed = MetricsWriter(tmp_path, resume_step=2, log_to=["tensorboard"])
    for step in range(3, 6):
        resumed.log(step, {"reward": 100.0 + step})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload().Scalars("reward")
    assert [(e.step, e.value) for e in events] == [(1, 1.0), (2, 2.0), (3, 103.0), (4, 104.0), (5, 105.0)]
    assert [json.loads(line)["reward"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 103, 104, 105]


def test_completions_with_unicode_line_separators_survive_reading_and_resume(tmp_path):
    """samples.jsonl keeps U+2028 / U+2029 / U+0085 raw (ensure_ascii=False); str.splitlines split rows there, both
    halves failed to parse: the report lost those completions and a resume deleted them from disk."""
    from ponder.metrics import MetricsWriter, read_jsonl

    w = MetricsWriter(tmp_path, tensorboard=False)
    texts = ["a\u2028b", "c\u2029d", "e\x85f", "plain"]
    for step, text in enumerate(texts, 1):
        w.log(step, {"reward": 1.0})
        w.samples(step, [{"completion": text}])
    w.close()
    assert [r["completion"] for r in read_jsonl(tmp_path / "samples.jsonl")] == texts
    MetricsWriter(tmp_path, resume_step=3, tensorboard=False).close()  # a resume at step 3 keeps steps 1-3
    assert [r["completion"] for r in read_jsonl(tmp_path / "samples.jsonl")] == texts[:3]


def test_a_start_over_in_a_run_directory_keeps_nothing_of_the_attempt_before(tmp_path):
    """An attempt that saved no checkpoint, started again under the same name: metrics.jsonl kept its step-0 rows and
    TensorBoard its every event (the new run's curves drawn over the old one's)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ponder.metrics import MetricsWriter

    first = MetricsWriter(tmp_path, resume_step=0, log_to=["tensorboard"])
    for step in range(0, 3):
        first.log(step, {"reward": 100.0 + step})
    first.close()
    again = MetricsWriter(tmp_path, resume_step=0, log_to=["tensorboard"])
    for step in range(0, 2):
        again.log(step, {"reward": float(step)})
    again.close()
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload().Scalars("reward")
    assert [(e.step, e.value) for e in events] == [(0, 0.0), (1, 1.0)]
    assert [json.loads(line)["reward"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0.0, 1.0]
