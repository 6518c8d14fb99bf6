"""Run by tests/test_eval_distributed.py under torchrun (not a test itself):
``eval_distributed_worker.py CHECKPOINT DATA_DIR SIZE OUT_PREFIX``.

Evaluates the checkpoint on the data set the way ``vertebra eval`` does under torchrun, through
:func:`vertebra.engine.evaluate.eval_process_group` and :func:`~vertebra.engine.evaluate.evaluate_dataset`, and
counts the images this rank's model saw. Each rank writes ``OUT_PREFIX.rank<R>.json``:
``{"rank", "world_size", "distributed", "images", "metrics"}``.
"""

import json
import sys

import torch

from vertebra.data.sources import DataSource
from vertebra.engine.distributed import is_distributed
from vertebra.engine.evaluate import eval_process_group, evaluate_dataset
from vertebra.engine.models import load_model
from vertebra.engine.tasks import ModelSpec, task_for


def main() -> None:
    torch.set_num_threads(1)
    checkpoint, data, size, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    with eval_process_group("cpu") as info:
        model, state = load_model(checkpoint, device=info.device)
        spec = ModelSpec.from_dict(state["model"])
        task = task_for(spec.task)
        ds, is_voc = task.eval_dataset(spec, DataSource(data=data), size)
        seen: list[int] = []
        model.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
        metrics = evaluate_dataset(task, model, ds, device=info.device, batch_size=2, voc=True, breakdown=True)
        result = {"rank": info.rank, "world_size": info.world_size, "distributed": is_distributed(),
                  "images": sum(seen), "metrics": metrics}
    with open(f"{out}.rank{info.rank}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
