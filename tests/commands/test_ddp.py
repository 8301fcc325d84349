"""DistributedDataParallel training: 2 CPU processes under torchrun with gloo hold the same weights."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKER = textwrap.dedent("""
    import os, sys, torch
    torch.set_num_threads(1)
    from fastar.train import train
    out = sys.argv[1]
    r = train("gated_pixelcnn", "digits", epochs=1, batch_size=8, lr=3e-3, out=out, device="cpu",
              config=dict(layers=2, channels=8), limit=64, eval_limit=16, progress=False, seed=1)
    import torch.distributed as dist
    rank = dist.get_rank()
    torch.save({k: v.detach() for k, v in r["model"].state_dict().items()}, os.path.join(out, f"rank{rank}.pt"))
    torch.save({"world": dist.get_world_size(), "steps": r["step"], "backend": dist.get_backend()},
               os.path.join(out, f"meta{rank}.pt"))
    dist.destroy_process_group()
""")


def test_two_cpu_ranks_hold_the_same_weights(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for m in (torch.load(tmp_path / f"meta{k}.pt", weights_only=True) for k in (0, 1)):
        # 64 examples, 2 ranks x 8 per step: 4 steps, each rank seeing its own shard
        assert m == {"world": 2, "steps": 4, "backend": "gloo"}
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    # training moved the weights away from the seeded initialisation
    from fastar import registry

    torch.manual_seed(1)
    init = registry.build_model("gated_pixelcnn", dict(in_channels=1, levels=2, layers=2, channels=8)).state_dict()
    assert any(not torch.equal(init[k], w0[k]) for k in init)
    # rank 0 alone wrote the checkpoint, holding the same weights
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["train"]["world_size"] == 2
    for k in w0:
        assert torch.equal(ck["state_dict"][k], w0[k]), k
