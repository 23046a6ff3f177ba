"""Data parallelism on CPU with gloo: W ranks, each with its own prompt groups and the policy sharded by FSDP2
(both train.sharding modes, with either policy pass), must train exactly like one unsharded process on the
whole batch (tests/dist_gradient_check.py runs the cases inside torchrun).

Tolerances: the last update's gradient within 1e-5 of the one process's, relative to its largest entry
(float32 sums in another order; measured about 1e-7); the weights after all updates within 1e-4 of the one
process's move from the initial weights, in L2 norm (measured about 1e-5: AdamW divides by sqrt(v), which
turns the gradients' rounding into a larger relative error of the update where a gradient is near zero).
"""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

GRAD_TOL, WEIGHT_TOL = 1e-5, 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, nproc: int, args: list[str], timeout: float, torchrun: list[str] = (),
           env: dict | None = None) -> subprocess.CompletedProcess:
    """torchrun (its own options: `torchrun`; its environment: `env`, else this one) in its own process group,
    killed whole after `timeout` seconds: a hung rank fails the test."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(free_port()),
           *torchrun, script, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{nproc} ranks did not finish in {timeout:.0f} s (a rank hung); last output:\n{(out + err)[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# each sharding mode with the padded policy pass and with the packed pass (auto; named here), once with
# checkpointed layers, every case. Four ranks (on CI's two cores, the suite's longest test) run one of each sharding
# mode and each pass, and the cases where the ranks' count matters: per-rank counts uneven (every loss_agg), a rank
# left empty, the batch's std over all ranks, nothing left anywhere. How a pass computes does not depend on the
# ranks' count; how the batch is dealt does.
MODES = ("fsdp+padded", "fsdp_noreshard+padded", "fsdp+packed", "fsdp_noreshard+packed+ckpt")
FOUR = ("grpo/uneven/mb4/mu2", "dapo/uneven/mb4/mu2", "dr_grpo/uneven/mb4/mu2", "bnpo/uneven/mb4/mu2", "grpo/empty_rank/mb4",
        "bnpo/empty_rank", "batch_std/uneven/mb2", "all_masked")
# LoRA: the adapters' gradients summed across ranks as full parameters' are, the rollout copy following the
# adapters; with the KL term against the base (the sharded policy with its adapters switched off), and through
# the packed pass (each layer's LoRA modules called inside its FSDP hooks)
LORA_CASES = ("dr_grpo/uneven/mb4/mu2", "bnpo/empty_rank", "batch_std")
RUNS = {  # world: {mode: its cases (none: every case)}, one torchrun job each
    2: {**dict.fromkeys(MODES, ()), "fsdp+lora+kl+padded": LORA_CASES, "fsdp_noreshard+lora+packed": LORA_CASES},
    4: {"fsdp_noreshard+padded": FOUR, "fsdp+packed": FOUR, "fsdp_noreshard+lora+packed": LORA_CASES},
}


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_train_like_one_process_on_the_whole_batch(tmp_path, world):
    out = tmp_path / "result.json"
    runs = [f"{mode}:{','.join(cases)}" if cases else mode for mode, cases in RUNS[world].items()]
    proc = launch("tests/dist_gradient_check.py", world, [str(out), *runs], timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    check(json.loads(out.read_text()), RUNS[world], world)


def check(results: dict, runs: dict, world: int) -> None:
    for mode, per_rank in results.pop("plan").items():  # the memory plan counts a rank's shards, not whole tensors
        assert sum(r["mine"] for r in per_rank) == per_rank[0]["sum"] == per_rank[0]["whole"] > 0, (mode, per_rank)
        assert all(r["mine"] < r["whole"] for r in per_rank), (mode, per_rank)
    for mode, per_rank in results.pop("rollouts").items():  # each rank decodes from the current full weights
        for r in per_rank:
            assert r["copy_diff"] == 0 and r["moved"] > 0 and r["same_rollouts"], (mode, r)
    assert {key.split(":")[0] for key in results} == set(runs)
    for key, r in results.items():
        case = key.split(":")[1]
        assert r["updates"] == [r["ref_updates"]] * world, (key, r)  # every rank as many optimizer steps as one process
        assert r["grad"] < GRAD_TOL, (key, r)
        # the first update's KL: none without the term; with it, the reference differs from the policy (with LoRA
        # the base, the adapters switched off on the sharded model: the policy's own log-probs would give 0)
        assert (r["kl"] > 0) == ("kl" in key.split(":")[0].split("+") and case != "all_masked"), (key, r)
        if case == "all_masked":  # nothing to learn anywhere: no step at all (AdamW would still decay the weights)
            assert r["moved"] == 0 and r["weights"] == 0, (key, r)
        else:
            assert r["moved"] > 0 and r["weights"] < WEIGHT_TOL, (key, r)


def test_batch_std_scales_by_the_whole_step_not_one_resampling_round(smoke_cfg):
    """Dynamic sampling draws a second round; batch_std must divide by the std of every kept group's rewards."""
    import torch

    from ponder.rl.advantages import advantages
    from ponder.rl.trainer import GRPOTrainer

    t = GRPOTrainer(smoke_cfg("name=batch-std", "rollout.prompts_per_step=4", "algorithm.advantage=batch_std",
                              "algorithm.dynamic_sampling=true", "rewards={test_char_hash: 1.0}"))
    score, rounds = t.rewards.score, []

    def scaled(completions, prompts, columns):  # round 0: every other group uniform (dropped), small rewards
        totals, per_fn = score(completions, prompts, columns)
        G, r = t.cfg.rollout.group_size, len(rounds)
        rounds.append(r)
        return [1.0 if r == 0 and (i // G) % 2 else x * (1 + 9 * r) for i, x in enumerate(totals)], per_fn

    t.rewards.score = scaled
    kept, _, _ = t.collect()
    assert rounds == [0, 1] and len(kept) == 4
    expected = advantages(torch.tensor([g.rewards for g in kept]), "batch_std")
    got = torch.tensor([[s.advantage for s in g.samples] for g in kept])
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sharded_checkpoint_kill_and_resume_repeats_the_uninterrupted_run(tmp_path, lora):
    """Two ranks, fsdp: checkpoints hold each rank's shards (torch.distributed.checkpoint) and a Hugging Face
    export; a run killed after step-2 and resumed ends with the uninterrupted run's figures and weights, bit for
    bit; the export loads with from_pretrained; one process without sharding resumes from the shards too.
    LoRA: the export is the merged model (rank 0 merges the gathered state), the adapters resume from the shards."""
    import copy

    import torch
    from safetensors.torch import load_file
    from test_resume_and_errors import KILLER, _metrics
    from transformers import AutoModelForCausalLM

    from ponder.config import load_config
    from ponder.rl.trainer import GRPOTrainer

    script = tmp_path / "run_with_killer.py"
    script.write_text(KILLER)

    def run(name, *extra, kill_at=0):
        args = ["train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", f"name={name}", "train.steps=4",
                "train.save_every=2", "train.threads=1", "train.log_to=[]", "train.sharding=fsdp", "rewards.killer=0.0",
                *(["model.lora={r: 4, alpha: 8}", "optim.lr=1e-2"] if lora else []), *extra]
        os.environ["KILL_AT_CALL"] = str(kill_at)  # each rank counts its own reward calls
        try:
            return launch(str(script), 2, args, timeout=240)
        finally:
            del os.environ["KILL_AT_CALL"]

    full = run("full")
    assert full.returncode == 0, full.stderr[-3000:]
    killed = run("cut", kill_at=4)  # start-up check is call 1, step k call k + 1: killed in step 3
    assert killed.returncode != 0
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-2"]
    assert (tmp_path / "cut" / "checkpoints" / "step-2" / "sharded" / ".metadata").is_file()
    resumed = run("cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _metrics(tmp_path / "full" / "metrics.jsonl"), _metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4] and a == b
    step4 = [tmp_path / run / "checkpoints" / "step-4" for run in ("full", "cut")]
    weights = [load_file(d / "model.safetensors") for d in step4]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    model = AutoModelForCausalLM.from_pretrained(step4[1])
    assert all(torch.equal(p, weights[1][k]) for k, p in model.state_dict().items() if k in weights[1])

    # a different world size: one process, unsharded, reads the two ranks' shards (weights and AdamW moments)
    cfg = load_config("recipes/smoke-first-digit.yaml", [f"output_dir={tmp_path}", "name=cut", "train.steps=5",
                                                          "train.sharding=none", "train.log_to=[]",
                                                          *(["model.lora={r: 4, alpha: 8}"] if lora else [])])
    t = GRPOTrainer(cfg, resume=True)
    plain = copy.deepcopy(t.model).merge_and_unload() if lora else t.model  # the export merged the adapters
    assert t.step_no == 4 and plain.state_dict().keys() >= weights[1].keys()
    assert all(torch.equal(p, weights[1][k]) for k, p in plain.state_dict().items() if k in weights[1])
    moments = [s["exp_avg"] for s in t.optimizer.state.values()]
    trained = [n for n, p in t.model.named_parameters() if p.requires_grad]
    assert len(moments) == len(trained) and all(m.abs().sum() > 0 for m in moments)
    assert all("lora_" in n for n in trained) == lora


LORA = ["model.lora={r: 4, alpha: 8}", "optim.lr=1e-2"]


@pytest.mark.parametrize("extra", [["train.forward=padded"], ["train.forward=packed", "algorithm.beta=0.04"], [*LORA, "algorithm.beta=0.04"],
                                   [*LORA, "train.precision=bf16"]], ids=["padded", "packed+kl", "lora+kl", "lora+bf16"])
def test_fsdp_on_one_process_trains_saves_and_rolls_back(smoke_cfg, extra):
    """train.sharding=fsdp on one process (how one GPU gets CPU offload; offload on too, a no-op on CPU): steps
    run, the rollout copy follows the updates, and a guardrail rollback restores the sharded checkpoint's
    weights and AdamW moments. Also with the packed pass and a KL reference (sharded, forward only), and with
    LoRA (the adapters alone move; the reference is the sharded policy with its adapters switched off), also over
    bf16 base weights (the rollout copy keeps them bf16 where its dtype is float32, as the unsharded engine runs them)."""
    import torch
    import torch.distributed as dist

    from ponder import checkpoint, sharding
    from ponder.rl.guardrails import restore
    from ponder.rl.trainer import GRPOTrainer

    def full(t):
        return {k: sharding.full_tensor(v).clone() for k, v in t.model.state_dict().items()}

    def moments(t):
        return [sharding.full_tensor(s["exp_avg"]).clone() for s in t.optimizer.state.values()]

    try:
        t = GRPOTrainer(smoke_cfg("name=fsdp1", "train.sharding=fsdp", "train.offload=true", "train.log_to=[]",
                                  "rollout.prompts_per_step=4", "rewards={test_char_hash: 1.0}", *extra))
        lora = LORA[0] in extra
        assert sharding.is_sharded(t.model) and t.policy_pass.packed == ("train.forward=padded" not in extra)
        kl = "algorithm.beta=0.04" in extra
        assert (t.ref is not None and sharding.is_sharded(t.ref)) == (kl and not lora)
        initial = full(t)
        first = t.step()
        saved, saved_moments = full(t), moments(t)
        moved = [k for k in saved if not torch.equal(initial[k], saved[k])]
        assert moved and all("lora_" in k for k in moved) == lora
        copy = dict(t.rollout_weights.model.named_parameters(remove_duplicate=False))
        head = "base_model.model.lm_head.weight" if lora else "lm_head.weight"
        assert all(torch.equal(copy[k], saved[k]) for k in copy) and head in copy  # float32 on CPU
        t.save()
        second = t.step()
        assert any(not torch.equal(v, saved[k]) for k, v in full(t).items())
        if kl:  # the reference is the initial policy: no divergence at the first step, some at the second
            assert first["kl"] == 0 and second["kl"] > 0, (first["kl"], second["kl"])
        restore(t, checkpoint.latest(t.ckpt_dir))
        assert all(torch.equal(v, saved[k]) for k, v in full(t).items())
        assert all(torch.equal(a, b) for a, b in zip(moments(t), saved_moments))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("extra", [[], LORA], ids=["full", "lora"])
def test_an_unsharded_run_continues_sharded_with_its_weights_and_moments(smoke_cfg, extra):
    """A checkpoint of one unsharded process (AdamW's state keyed by parameter position) resumed with fsdp: each
    rank takes its shards of the weights and of every moment (one process here: the code path of N ranks), and the
    run goes on from there."""
    import torch
    import torch.distributed as dist

    from ponder import sharding
    from ponder.rl.trainer import GRPOTrainer

    common = ("name=grow", "train.log_to=[]", "rollout.prompts_per_step=4", "rewards={test_char_hash: 1.0}", *extra)
    plain = GRPOTrainer(smoke_cfg(*common, "train.steps=1"))
    plain.step()
    plain.save()
    weights = {k: v.clone() for k, v in plain.model.state_dict().items()}
    names = [n for n, p in plain.model.named_parameters() if p.requires_grad]
    moments = {n: (plain.optimizer.state[p]["exp_avg"].clone(), plain.optimizer.state[p]["exp_avg_sq"].clone())
               for n, p in plain.model.named_parameters() if p.requires_grad}
    try:
        t = GRPOTrainer(smoke_cfg(*common, "train.steps=2", "train.sharding=fsdp"), resume=True)
        assert sharding.is_sharded(t.model) and t.step_no == 1
        assert all(torch.equal(sharding.full_tensor(v), weights[k]) for k, v in t.model.state_dict().items())
        got = {n: t.optimizer.state[p] for n, p in t.model.named_parameters() if p.requires_grad}
        assert list(got) == names and any(m.abs().sum() > 0 for m, _ in moments.values())  # LoRA: A still has none
        for n, (m, v) in moments.items():
            assert torch.equal(sharding.full_tensor(got[n]["exp_avg"]), m)
            assert torch.equal(sharding.full_tensor(got[n]["exp_avg_sq"]), v)
        t.step()
        assert t.step_no == 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_nodes_of_one_process_each_train_like_one_process(tmp_path):
    """The multi-node launch of the README on one machine: two torchrun "nodes" (--nnodes 2, one process each,
    both local rank 0) meeting at a c10d rendezvous endpoint; fsdp with a rank left empty."""
    out, port = tmp_path / "result.json", free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", "tests/dist_gradient_check.py", str(out),
           "fsdp:grpo/empty_rank"]
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for _ in range(2)]
    try:
        logs = [node.communicate(timeout=180)[0] for node in nodes]
    except subprocess.TimeoutExpired:
        for node in nodes:
            os.killpg(node.pid, signal.SIGKILL)
        pytest.fail("the two nodes did not finish in 180 s")
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-2000:] for log in logs)
    results = json.loads(out.read_text())
    r = results["fsdp:grpo/empty_rank"]
    assert r["updates"] == [1, 1] and r["grad"] < GRAD_TOL and 0 < r["moved"] and r["weights"] < WEIGHT_TOL, r
    assert all(x["same_rollouts"] and x["copy_diff"] == 0 for x in results["rollouts"]["fsdp"])


def test_logged_figures_of_several_ranks_are_the_whole_batchs(monkeypatch):
    """Each rank's loss is its share of the batch's (normalisers count every rank): averaged, two ranks logged half
    the loss one process logs for the same batch. A skipped update is one decision of all ranks: summed, two ranks
    logged 2 skips a step. Each rank decodes its own prompts at once: throughput adds up."""
    import torch.distributed as dist

    from ponder import distributed

    ranks = [{"loss": -0.03, "skipped_updates": 1.0, "tokens_per_s": 100.0, "entropy": 0.5, "completion_len/max": 7},
             {"loss": -0.01, "skipped_updates": 1.0, "tokens_per_s": 120.0, "entropy": 0.7, "completion_len/max": 9}]
    counts = [{}, {}]
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world", lambda: 2)
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), list(zip(ranks, counts))))
    got = distributed.mean_metrics(ranks[0])
    assert got == pytest.approx({"loss": -0.04, "skipped_updates": 1.0, "tokens_per_s": 220.0, "entropy": 0.6,
                                 "completion_len/max": 9})
    # a rank whose groups hold one task of a mix: the other task's figures come from the ranks that have them
    ranks[0]["accuracy/arithmetic"], ranks[1]["accuracy/countdown"] = 0.5, 0.25
    assert distributed.mean_metrics(ranks[0])["accuracy/countdown"] == 0.25
    # means over samples and tokens weigh each rank by its count (an equal weight logged 0.5 and 3.0 below): rank 0
    # has 3 samples all right and 30 nats over 30 tokens, rank 1 one wrong sample and 50 nats over 10 tokens
    ranks[:] = [{"reward": 1.0, "entropy": 1.0}, {"reward": 0.0, "entropy": 5.0}]
    counts[:] = [{"reward": 3, "entropy": 30}, {"reward": 1, "entropy": 10}]
    assert distributed.mean_metrics(*zip(ranks, counts).__next__()) == pytest.approx({"reward": 0.75, "entropy": 2.0})


def test_cpu_offload_on_one_process_shards_with_fsdp(smoke_cfg):
    """FSDP2's CPU offload is what offloads: with train.sharding auto on one process, train.offload=true resolved to
    no sharding and was ignored without a word."""
    from ponder import sharding
    from ponder.errors import UserError

    assert sharding.resolve("auto", 1, offload=True) == "fsdp" and sharding.resolve("auto", 1) == "none"
    assert sharding.resolve("fsdp_noreshard", 2, offload=True) == "fsdp_noreshard"
    with pytest.raises(UserError, match=r"^train.offload=true needs FSDP2 \(train.sharding fsdp or auto\), not "
                                        r"train.sharding=none$"):
        sharding.resolve("none", 1, offload=True)


def test_other_commands_than_train_refuse_torchrun(monkeypatch, error_line, tmp_path):
    """Under torchrun every rank of `ponder distill` sampled into one file, and `ponder pretrain` trained twice into
    one directory."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert error_line("eval", "--model", "tiny-random", "--tasks", "arithmetic", "--out", str(tmp_path / "e")) == (
        "ponder: error: ponder eval runs one process, and torchrun started 2; start it without torchrun (`ponder "
        "train` is the command that runs on several)")
    assert list(tmp_path.iterdir()) == []


def test_a_step_holding_one_task_of_a_mix_logs_that_tasks_figures(smoke_cfg):
    """Per-task figures came only from a step (a rank's share of one) that held two tasks: with one prompt a step,
    no step of a two-task mix logged any, and under torchrun ranks holding one task left gaps in the curves."""
    from ponder.rl.trainer import GRPOTrainer

    t = GRPOTrainer(smoke_cfg("name=mix", "rollout.prompts_per_step=1",
                              "data.tasks=[{name: first_digit, split: train}, {name: arithmetic, split: train}]"))
    m = t.step()
    task = t.last_groups[0].example["task"]
    assert f"completion_len/{task}" in m and m[f"completion_len/{task}"] == m["completion_len/mean"]


def test_a_mistake_every_rank_raises_is_said_once(monkeypatch, tmp_path, capsys):
    """Under torchrun each rank raised the same config error and printed it: N copies of the one line."""
    import tempfile

    from ponder import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-42")
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    for _ in range(2):  # two ranks of one launch
        distributed.say_once("ponder: error: config optim.lr: expected a number")
    distributed.say_once("ponder: error: only this rank's")
    assert capsys.readouterr().err == "ponder: error: config optim.lr: expected a number\nponder: error: only this rank's\n"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-43")  # the next launch says it again
    distributed.say_once("ponder: error: config optim.lr: expected a number")
    assert capsys.readouterr().err == "ponder: error: config optim.lr: expected a number\n"


def test_ranks_share_an_evaluation_and_give_one_process_figures(tmp_path):
    """Rank 0 evaluated alone while the other ranks waited in a collective (past torch's timeout, the run ended).
    Now each rank samples its share of the chunks: the same answers and figures as one process."""
    sys.path.insert(0, os.path.dirname(__file__))
    import dist_eval_check

    out = tmp_path / "two.json"
    proc = launch("tests/dist_eval_check.py", 2, [str(out)], timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    two, one = json.loads(out.read_text()), json.loads(json.dumps(dist_eval_check.run(), default=str))
    assert [s["completion"] for s in two["samples"]] == [s["completion"] for s in one["samples"]]
    calls = two.pop("calls")
    assert one.pop("calls") == sum(calls) == 4 and calls == [2, 2]  # 7 problems in chunks of 2: dealt out in turn
    assert two == one and two["metrics"]["problems"] == 7


@pytest.mark.parametrize("where", ["report", "checkpoint"])
def test_an_error_on_rank_0_alone_stops_every_rank_with_one_line(tmp_path, where):
    """Rank 0 alone fails (a UserError writing the report; the disk full writing a checkpoint) while rank 1 waits
    for it in a collective: rank 1 died with gloo's "Connection closed by peer" traceback, and the full disk was a
    traceback on rank 0 too. Now rank 0 says its one line and leaves, marking the group's store; rank 1's
    collective fails at once and it says, once, that another rank stopped. torchrun checks its workers every 5 s
    here (0.1 by default), so that its SIGTERM, which would end rank 1 silently (also fine), does not race rank 1's
    own exit, the path under test."""
    logs = tmp_path / "logs"
    args = [where, "train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "name=r", "train.steps=1",
            "train.threads=1", "train.log_to=[]"]
    proc = launch("tests/dist_rank_fails.py", 2, args, timeout=120,
                  torchrun=["--monitor-interval", "5", "--log-dir", str(logs), "--redirects", "3"])
    err = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}  # each rank's own stderr
    assert proc.returncode != 0 and sorted(err) == [0, 1], proc.stderr[-3000:]
    assert not any("Traceback" in e for e in err.values()), err
    said = [[line for line in err[r].splitlines() if line.startswith("ponder:")] for r in (0, 1)]
    first = (f"ponder: error: {tmp_path}/r/report.html is not writable" if where == "report" else
             f"ponder: error: could not write checkpoint step-1 in {tmp_path}/r/checkpoints: [Errno 28] No space left on "
             "device: 'model.safetensors'; free space or fix the permissions, then --resume continues from the last "
             "checkpoint written (if none, run again)")
    assert said == [[first], ["ponder: stopped: another rank stopped on an error (its message says why)"]], err
    if where == "checkpoint":
        assert not (tmp_path / "r" / "checkpoints" / "step-1").exists()


def test_resume_may_change_how_the_run_is_sharded(tmp_path, capsys):
    """train.sharding says how a run is laid out over processes, not what it learns, and every checkpoint loads into
    every layout: resuming with it given, even as what auto had resolved to, asked for --allow-changes. So did
    train.collective_timeout, how long a rank waits for the others."""
    import yaml

    from ponder.cli import main

    base = ["train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "name=s", "train.threads=1",
            "train.log_to=[]", "rollout.prompts_per_step=4"]
    assert main(base + ["train.steps=1"]) == 0
    assert main(base + ["train.steps=2", "train.sharding=none", "--resume"]) == 0, capsys.readouterr().err  # auto's here
    # sharded (FSDP2 on one process: the code path of N ranks) from the unsharded checkpoint
    assert main(base + ["train.steps=3", "train.sharding=fsdp", "train.collective_timeout=30", "--resume"]) == 0, \
        capsys.readouterr().err
    run = tmp_path / "s"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (run / "checkpoints" / "step-3" / "sharded").is_dir()
    assert yaml.safe_load((run / "config.yaml").read_text())["changes"] == [
        {"key": "train.steps", "old": 1, "new": 2, "from_step": 2},
        {"key": "train.sharding", "old": "auto", "new": "none", "from_step": 2},
        {"key": "train.steps", "old": 2, "new": 3, "from_step": 3},
        {"key": "train.sharding", "old": "none", "new": "fsdp", "from_step": 3},
        {"key": "train.collective_timeout", "old": 180.0, "new": 30.0, "from_step": 3}]


@pytest.mark.parametrize("omp, threads", [(None, [4, 2]), ("1", [1, 2])], ids=["default", "omp"])
def test_ranks_of_one_machine_divide_its_cores(tmp_path, omp, threads):
    """Two ranks on a machine of 8 cores (as the ranks see it): 4 threads each. Each took torchrun's default,
    OMP_NUM_THREADS=1, and used 2 of the 8 cores (without torchrun's, every rank all 8: the machine oversubscribed).
    An OMP_NUM_THREADS the user sets stands, 1 too (torchrun's value, but the user's), and so does train.threads
    (a second trainer in the same ranks)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if omp:
        env["OMP_NUM_THREADS"] = omp
    out = tmp_path / "threads.json"
    proc = launch("tests/dist_threads_check.py", 2, [str(out), f"output_dir={tmp_path}"], timeout=120, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert json.loads(out.read_text()) == {"default": [threads[0]] * 2, "train.threads=2": [threads[1]] * 2}


@pytest.mark.parametrize("raised, other, line, code, told", [
    ("sigterm", None, "stopped", 143, "sigterm"),  # a SIGTERM of this rank alone (or the first of a scheduler's)
    ("sigterm", "error", "other", 1, "error"),  # torchrun's SIGTERM once the failing rank had exited
    ("collective", "error", "other", 1, "error"),  # the collective failed as that rank left
    ("collective", "sigterm", "stopped", 143, "sigterm"),  # a scheduler's SIGTERM reached the other rank first
])
def test_a_rank_stopped_by_another_ranks_leaving_says_why_that_rank_left(monkeypatch, capsys, raised, other, line, code, told):
    """How a rank ends when another left first, by what it got (a SIGTERM, a failed collective) and why the other left
    (the mark in the group's store). torchrun's SIGTERM to the other ranks after one rank's error made them say they
    were stopped by SIGTERM and to --resume, hiding the error; a failed collective after a scheduler's SIGTERM to every
    rank said 'another rank stopped on an error'. (On two real ranks the first case races torchrun's monitor, which
    seldom wins here: hence stand-ins for the store.)"""
    from ponder import cli, distributed, report, stopping

    def fail(*_):
        raise stopping.Terminated() if raised == "sigterm" else RuntimeError("Connection closed by peer")

    left = []
    monkeypatch.setattr(report, "write_report", fail)
    monkeypatch.setattr(distributed, "another_rank_stopped", lambda: other)
    monkeypatch.setattr(distributed, "teardown", lambda clean=True, why="error": left.append((clean, why)))
    assert cli.main(["report", "runs/x"]) == code
    assert capsys.readouterr().err.splitlines() == [cli.stopped("report") if line == "stopped" else cli.OTHER_STOPPED]
    assert left == [(False, told)]  # this rank's own mark: a SIGTERM of its own is not an error of its own


def test_the_trainer_says_what_each_logged_mean_is_over(smoke_cfg, monkeypatch):
    """mean_metrics weighs the ranks by these counts: the samples of a step, its groups, its scored tokens."""
    from ponder import distributed
    from ponder.rl.trainer import GRPOTrainer

    seen = []
    monkeypatch.setattr(distributed, "mean_metrics", lambda m, w=None: seen.append((m, w)) or m)
    trainer = GRPOTrainer(smoke_cfg("rollout.prompts_per_step=2", "train.skip_zero_advantage=false"))
    trainer.step()
    m, w = seen[0]
    samples = 2 * trainer.cfg.rollout.group_size
    assert w["reward"] == w["accuracy"] == w["truncated_frac"] == w["completion_len/mean"] == samples
    assert w["zero_var_groups_frac"] == 2
    assert w["entropy"] == w["kl"] == sum(len(s.completion_ids) for g in trainer.last_groups for s in g.samples)
