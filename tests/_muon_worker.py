"""torchrun worker for tests/test_optim.py: ParallelMuon steps on gloo (2 or 4 ranks) with rank-dependent gradients.

    python -m torch.distributed.run --standalone --nproc_per_node=N tests/_muon_worker.py OUTDIR

For NUM_LAYERS in (4, 3) (3: banks of 3 matrices, not divisible by the world size) every rank builds the
same tiny model, perturbs the banks with a shared seed, sets gradients seeded by (rank, step) (all zero in
step 0, so that step is pure weight decay), runs launch_reduce_scatter / wait_reduce_scatter / step, and
saves its banks after each step together with its gradients, so the test can recompute the steps
single-process from the average gradient.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import train_gpt as tg  # noqa: E402
from conftest import TINY  # noqa: E402

CLIPS = (1.0, 1.0, 0.7)  # clip coefficient of each step; step 0 has zero gradients (weight decay only)


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    d = tg.Dist(rank=rank, world_size=world, device=torch.device("cpu"))
    for num_layers in (4, 3):
        hp = tg.Hyperparameters(**{**TINY, "num_layers": num_layers, "embed_proj_muon": False})  # the banks alone
        hp.validate()
        torch.manual_seed(hp.seed)
        model = tg.GPT(hp)
        g = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for name in tg.BANKS:
                p = getattr(model, name)
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        muon, _, _ = tg.build_optimizers(model, hp, d)
        record = {"init": {n: getattr(model, n).detach().clone() for n in tg.BANKS}, "grads": [], "after": [],
                  "shard_grads": [], "owned_sq_norm": []}
        for step, clip in enumerate(CLIPS):
            gg = torch.Generator().manual_seed(1000 * (rank + 1) + step)
            grads = {}
            for name in tg.BANKS:
                p = getattr(model, name)
                p.grad = torch.randn(p.shape, generator=gg) if step > 0 else torch.zeros(p.shape)
                grads[name] = p.grad.clone()
            muon.launch_reduce_scatter()
            shard_grads = muon.wait_reduce_scatter()
            record["shard_grads"].append({n: g.clone() for n, g in zip(tg.BANKS, shard_grads)})
            record["owned_sq_norm"].append(float(muon.owned_grad_sq_norm(shard_grads)))
            muon.step(shard_grads, torch.tensor(clip))
            model.zero_grad(set_to_none=True)
            record["grads"].append(grads)
            record["after"].append({n: getattr(model, n).detach().clone() for n in tg.BANKS})
        torch.save(record, out / f"L{num_layers}_rank{rank}.pt")
    proj_steps(out, rank, d)
    dist.barrier()
    dist.destroy_process_group()


def proj_steps(out: Path, rank: int, d) -> None:
    """EMBED_PROJ_MUON=1: each projection is a one-matrix bank, owned by rank 0 (the others own zero rows).
    Two steps with rank-dependent gradients; saves the projections' gradients and values after each step."""
    hp = tg.Hyperparameters(**{**TINY, "num_layers": 3, "embed_proj_muon": True, "embed_proj_init": "orthogonal"})
    torch.manual_seed(hp.seed)
    model = tg.GPT(hp)
    muon, _, _ = tg.build_optimizers(model, hp, d)
    record = {"init": {n: model.get_parameter(n).detach().clone() for n in tg.PROJ_NAMES}, "grads": [], "after": []}
    for step in range(2):
        gg = torch.Generator().manual_seed(77 * (rank + 1) + step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gg)
        record["grads"].append({n: model.get_parameter(n).grad.clone() for n in tg.PROJ_NAMES})
        muon.launch_reduce_scatter()
        muon.step(muon.wait_reduce_scatter(), torch.tensor(1.0))
        record["after"].append({n: model.get_parameter(n).detach().clone() for n in tg.PROJ_NAMES})
    torch.save(record, out / f"proj_rank{rank}.pt")


if __name__ == "__main__":
    main()
