"""Worker for tests/distributed/test_sequence_parallel.py (2 processes, gloo, fp32). One launch per backend:

1. `attention` (first launch only): one CogVideoX attention layer (the 5B tiny twin's: RoPE, qk-norm) on a joint
   text + video sequence of S = 27 video tokens (odd: the last chunk is padded), through the Ulysses processor with
   SP = 2 against diffusers' stock processor on the whole sequence on the same rank. Writes the output difference and
   the input and parameter gradient differences (the SP ranks' gradients summed over the group / SP, see
   parallel/sequence.py).
2. Two trainers in turn on the tiny CogVideoX-5B twin (ADM, 27 video tokens), SP = 1 (2 data-parallel ranks) and
   SP = 2 (one SP group): the step-0 gradients of every updated role (full tensors), the losses of steps 0 and 1,
   and the shapes of every call's transformer-block input.

Usage: torchrun --nproc-per-node 2 sequence_worker.py BACKEND OUT_DIR TINY_PIPELINE [attention]
(SEQUENCE_WORKER_OVERRIDES: more recipe overrides, space-separated, for manual checks)
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from parallel.runtime_env import apply_runtime_defaults  # noqa: E402
apply_runtime_defaults()
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from parallel.distributed import init_distributed  # noqa: E402
from parallel.sequence import SequenceShards  # noqa: E402
from tests.helpers import recorded_steps  # noqa: E402
from trainer.config import load_recipe  # noqa: E402
from trainer.stages.training import build_stage_trainer  # noqa: E402

backend, out_dir, pipeline = sys.argv[1:4]
info = init_distributed(need_group=True)
VIDEO_SHAPE = (3, 16, 6, 6)           # latent [F, C, h, w] at 48 x 48 px: 3 x 3 x 3 = 27 tokens of 2 x 2 patches
STEPS = 2


def attention_check() -> dict:
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
    from trainer.families.cogvideox import CogVideoXTransformer, UlyssesCogVideoXAttnProcessor
    from trainer.families.configs import load_config
    torch.manual_seed(0)
    model = CogVideoXTransformer.from_config(
        {k: v for k, v in load_config("cogvideox_5b_tiny").items() if not k.startswith("_")})
    attn = model.transformer_blocks[0].attn1
    width = attn.to_q.in_features
    text = torch.randn(2, 8, width)
    video = torch.randn(2, 27, width)
    cotangent_text, cotangent_video = torch.randn(2, 8, width), torch.randn(2, 27, width)
    rotary = model.rotary_embedding(torch.zeros(2, *VIDEO_SHAPE))

    def run(processor, shards):
        attn.zero_grad()
        attn.set_processor(processor)
        t, v = text.clone().requires_grad_(), video.clone().requires_grad_()
        kwargs = {"video_length": 27} if shards.active else {}
        out_video, out_text = attn(hidden_states=shards.shard(v), encoder_hidden_states=t, image_rotary_emb=rotary,
                                   **kwargs)
        out_video = shards.gather(out_video, 27)
        ((out_video * cotangent_video).sum() + (out_text * cotangent_text).sum()).backward()
        grads = {"text": t.grad, "video": v.grad, **{n: p.grad for n, p in attn.named_parameters()}}
        if shards.active:   # the SP ranks' shares add up to SP x the gradient of the one loss
            for g in grads.values():
                dist.all_reduce(g)
                g.div_(shards.size)
        return out_video.detach(), out_text.detach(), grads

    reference = run(CogVideoXAttnProcessor2_0(), SequenceShards())
    shards = SequenceShards.of_group(dist.group.WORLD)
    ulysses = run(UlyssesCogVideoXAttnProcessor(shards), shards)
    local_rows = shards.shard(video).shape[1]
    return {"local_rows": local_rows,
            "output": max((a - b).abs().max().item() for a, b in zip(reference[:2], ulysses[:2])),
            "output_scale": reference[0].abs().max().item(),
            "grads": {k: (reference[2][k] - ulysses[2][k]).abs().max().item() for k in reference[2]},
            "grad_scale": {k: reference[2][k].abs().max().item() for k in reference[2]}}


def train(sp: int) -> dict:
    run_dir = os.path.join(out_dir, f"run_{backend}_sp{sp}")
    recipe = load_recipe(os.path.join(ROOT, "recipes", "tiny", "cogvideox_5b_tiny.yaml"), [
        f"run.dir={run_dir}", f"teacher.pretrained={pipeline}", "family.height=48", "family.width=48",
        f"parallel.backend={backend}", f"parallel.sp={sp}", "parallel.zero3_persistence_threshold=0",
        "distill.train.batch_size=4", "distill.train.micro_batch_size=2", f"distill.train.steps={STEPS}",
        "distill.method.ttur=1", *os.environ.get("SEQUENCE_WORKER_OVERRIDES", "").split()])
    t = build_stage_trainer(recipe, run_dir, info, "distill")
    block_inputs = set()
    for role in ("teacher", "fake_score", "generator"):
        block = getattr(t.nets, role).transformer_blocks[0]
        block.register_forward_pre_hook(lambda m, args, kwargs: block_inputs.add(tuple(kwargs["hidden_states"].shape)),
                                        with_kwargs=True)
    grads, losses = recorded_steps(t, STEPS)
    if info.is_main:
        torch.save(grads, os.path.join(out_dir, f"{backend}_sp{sp}_grads.pt"))
    return {"losses": losses, "block_inputs": sorted(block_inputs)}


result = {}
if sys.argv[4:] == ["attention"]:
    result["attention"] = attention_check()
for sp in (1, 2):
    result[f"sp{sp}"] = train(sp)
shapes = [None] * info.world_size
dist.all_gather_object(shapes, {k: v["block_inputs"] for k, v in result.items() if k.startswith("sp")})
result["block_inputs_per_rank"] = shapes
if info.is_main:
    with open(os.path.join(out_dir, f"{backend}.json"), "w") as f:
        json.dump(result, f)
dist.destroy_process_group()
