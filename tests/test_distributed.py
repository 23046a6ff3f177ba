"""Data parallelism on CPU with gloo: W ranks, each with its own prompt groups and the policy sharded by FSDP2
(both train.sharding modes), must train exactly like one unsharded process on the whole batch
(tests/dist_gradient_check.py runs the cases inside torchrun).

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


def launch(script: str, nproc: int, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """torchrun in its own process group, killed whole after `timeout` seconds: a hung rank fails the test."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(free_port()),
           script, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{nproc} ranks did not finish in {timeout:.0f} s (a rank hung); last output:\n{(out + err)[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


MODES = ("fsdp", "fsdp_noreshard")


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_train_like_one_process_on_the_whole_batch(tmp_path, world):
    out = tmp_path / "result.json"
    proc = launch("tests/dist_gradient_check.py", world, [str(out), ",".join(MODES)], timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    results = json.loads(out.read_text())
    assert {key.split(":")[0] for key in results} == set(MODES)
    for key, r in results.items():
        case = key.split(":")[1]
        assert r["updates"] == [r["ref_updates"]] * world, (key, r)  # every rank as many optimizer steps as one process
        assert r["grad"] < GRAD_TOL, (key, r)
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
