"""Run by tests/test_distributed.py under torchrun (not a test itself): ``distributed_worker.py CONFIG.json OUT.json``.

Trains with the config through :class:`vertebra.engine.train.Trainer`, and after every optimizer step gathers
every rank's parameters and buffers and records the largest difference to rank 0's; then evaluates once more.
Rank 0 writes ``{"max_diff_per_step": [...], "eval": {...}, "world_size": W}`` to OUT.json.
"""

import json
import sys

import torch
import torch.distributed as dist

from vertebra.engine.config import TrainConfig
from vertebra.engine.train import Trainer


def main() -> None:
    torch.set_num_threads(1)
    with open(sys.argv[1]) as f:
        cfg = TrainConfig.from_dict(json.load(f))
    trainer = Trainer(cfg)
    world = dist.get_world_size()
    diffs: list[float] = []
    step = trainer.train_step

    def checked_step(batch):
        out = step(batch)
        flat = torch.cat([v.detach().double().flatten() for v in trainer.model.state_dict().values()])
        everyone = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(everyone, flat)
        diffs.append(max(float((x - everyone[0]).abs().max()) for x in everyone))
        return out

    trainer.train_step = checked_step
    trainer.fit()
    metrics = trainer.evaluate()
    if dist.get_rank() == 0:
        with open(sys.argv[2], "w") as f:
            json.dump({"max_diff_per_step": diffs, "eval": metrics, "world_size": world}, f)
    trainer.close()  # DDP goes before the process group
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
