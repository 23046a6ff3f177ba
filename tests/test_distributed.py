import json
import subprocess
import sys



def test_two_ranks_give_the_gradient_of_the_whole_batch(tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "tests/dist_gradient_check.py", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rel = json.loads(out.read_text())
    assert set(rel) == {"grpo", "dapo", "dr_grpo", "bnpo"}
    assert all(v < 1e-5 for v in rel.values()), rel
