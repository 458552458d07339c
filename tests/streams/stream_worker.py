"""Worker for the multi-process stream tests (run under torchrun). Modes:
  consume ROOT CACHE OUT BATCHES BATCH_SIZE   take BATCHES batches per rank, write ids per rank and rank 0's state
  replicate ROOT CACHE OUT BATCHES BATCH_SIZE as consume, with replication 2 (one sequence-parallel group)
  resume  ROOT CACHE OUT STATE BATCH_SIZE     load STATE, read the rest of the epoch, write ids
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from parallel.runtime_env import apply_runtime_defaults  # noqa: E402
apply_runtime_defaults()
from data.streams import TrainingStream  # noqa: E402

mode, root, cache, out = sys.argv[1:5]
rank = int(os.environ.get("RANK", "0"))
if mode in ("consume", "replicate"):
    batches, batch_size = int(sys.argv[5]), int(sys.argv[6])
    stream = TrainingStream("real_latents", root, cache, batch_size, seed=17,
                            replication=2 if mode == "replicate" else None)
    ids = [int(i) for _ in range(batches) for i in stream.next_batch().ids]
    with open(f"{out}/ids_rank{rank}.json", "w") as f:
        json.dump(ids, f)
    if rank == 0:
        with open(f"{out}/state.json", "w") as f:
            json.dump(stream.state_dict(), f)
else:
    state_path, batch_size = sys.argv[5], int(sys.argv[6])
    stream = TrainingStream("real_latents", root, cache, batch_size, seed=17)
    stream.load_state_dict(json.load(open(state_path)))
    ids = [int(i) for batch in stream.rest_of_epoch() for i in batch.ids]
    with open(f"{out}/resumed_rank{rank}.json", "w") as f:
        json.dump(ids, f)
