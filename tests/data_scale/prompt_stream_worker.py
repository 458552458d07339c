"""One tiny SDXL training stage built through the real stage code (build_stage_trainer) reading the generator's
prompts from a prompt stream (and DMD2's real latents from a real_latents stream), run to `distill.train.steps`.
Records, per rank, the sample ids of every stream read and the process's peak RSS into OUT/TAG_rank<r>.json.

argv: OUT TAG key=value ... (recipe overrides of recipes/tiny/sdxl_tiny.yaml)"""
import json
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from parallel.distributed import init_distributed, shutdown  # noqa: E402
from tests.helpers import ROOT  # noqa: E402
from trainer.config import load_recipe  # noqa: E402
from trainer.stages.training import build_stage_trainer  # noqa: E402

out, tag, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
info = init_distributed(need_group=True)
recipe = load_recipe(os.path.join(ROOT, "recipes", "tiny", "sdxl_tiny.yaml"), ["stages=[distill]", *overrides])
trainer = build_stage_trainer(recipe, recipe.run.dir, info)
reads = {"prompts": [], "real": []}


def record(adapter, into):
    """Note the ids of each batch the stream hands out (the stream itself is untouched)."""
    next_batch = adapter.stream.next_batch

    def recorded():
        batch = next_batch()
        into.append(batch.ids.tolist())
        return batch
    adapter.stream.next_batch = recorded


record(trainer.prompt_source, reads["prompts"])
if trainer.data_source is not None:
    record(trainer.data_source, reads["real"])
trainer.run()
peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
with open(os.path.join(out, f"{tag}_rank{info.rank}.json"), "w") as f:
    json.dump({**reads, "peak_rss_mb": peak_rss_mb, "step": trainer.step}, f)
shutdown()
