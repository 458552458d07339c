"""The SD3 and CogVideoX families against the stock diffusers classes and pipelines (tiny twins, random weights):
the family's denoiser call equals the stock forward, its taps equal the stock blocks' outputs, the 5B's rotary
embedding equals the pipeline's, and the precomputed prompt embeddings equal the pipeline's own encode_prompt."""
import os

import pytest
import torch

from tests.helpers import ROOT, SINGLE
from trainer.config import load_recipe
from trainer.families import build_family
from data.convert import read_prompt_texts
from trainer.stages import prepare_prompts
from trainer.tiny_pipeline import save_tiny_pipeline

TWINS = {"sd3_medium_tiny": "sd3_medium_tiny.yaml", "sd35_large_tiny": "sd35_large_tiny.yaml",
         "cogvideox_2b_tiny": "cogvideox_2b_tiny.yaml", "cogvideox_5b_tiny": "cogvideox_5b_tiny.yaml"}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_pipelines")
    return {model: save_tiny_pipeline(model, str(root / model)) for model in TWINS}


def twin(model, pipelines, tmp_path, *overrides):
    return load_recipe(os.path.join(ROOT, "recipes", "tiny", TWINS[model]),
                       [f"teacher.pretrained={pipelines[model]}", f"run.dir={tmp_path / 'run'}", *overrides])


def stock_class(family):
    return family.denoiser_class.__mro__[1]


@pytest.mark.parametrize("model", sorted(TWINS))
def test_denoiser_and_taps_match_the_stock_class(model, pipelines, tmp_path):
    import diffusers
    recipe = twin(model, pipelines, tmp_path, "family.taps=[0,1]")
    family = build_family(recipe)
    torch.manual_seed(0)
    net = family.build_denoiser().eval()
    stock = stock_class(family).from_config(family.config).eval()
    stock.load_state_dict(net.state_dict())
    x = torch.randn(2, *family.data_shape)
    t = torch.tensor([999.0, 420.0])
    cond = family.condition(torch.tensor([0, 3]))
    captured = []
    video = recipe.family.name == "cogvideox"
    for block in stock.transformer_blocks:   # a block returns (video, text) in CogVideoX, (text, image) in SD3
        block.register_forward_hook(lambda m, i, out: captured.append(out[0] if video else out[1]))
    with torch.no_grad():
        if video:
            kwargs = {}
            if family.config["use_rotary_positional_embeddings"]:
                pipe = diffusers.CogVideoXPipeline.from_pretrained(pipelines[model])
                kwargs["image_rotary_emb"] = pipe._prepare_rotary_positional_embeddings(
                    recipe.family.height, recipe.family.width, family.data_shape[0], torch.device("cpu"))
            reference = stock(hidden_states=x, encoder_hidden_states=cond["encoder_hidden_states"], timestep=t,
                              return_dict=False, **kwargs)[0]
        else:
            reference = stock(hidden_states=x, encoder_hidden_states=cond["encoder_hidden_states"],
                              pooled_projections=cond["pooled_projections"], timestep=t, return_dict=False)[0]
        out = net(x, t, **cond)
        taps = net(x, t, **cond, taps_only=True)
    assert out.shape == x.shape and torch.equal(out, reference)
    assert [tuple(f.shape[1:]) for f in taps] == [tuple(s) for s in family.tap_shapes()]
    for tap, tokens in zip(taps, captured):
        assert torch.equal(tap.flatten(2).transpose(1, 2), tokens)   # [B, D, grid] back to [B, N, D]
    heads = family.build_heads()
    assert heads(taps).shape == (2,)


@pytest.mark.parametrize("model", ["sd3_medium_tiny", "cogvideox_2b_tiny"])
def test_prompt_embeddings_are_the_pipelines_own(model, pipelines, tmp_path):
    import diffusers
    prompts = os.path.join(ROOT, "recipes", "prompts", "tiny.txt")
    recipe = twin(model, pipelines, tmp_path, f"family.prompts={prompts}", "family.uncond=empty_prompt",
                  "family.prompt_dtype=float32")
    prepare_prompts(recipe, recipe.run.dir, SINGLE, lambda message: None)
    family = build_family(recipe)
    texts = read_prompt_texts(prompts)
    assert family.num_prompts == len(texts)
    labels = torch.tensor([5, 0])
    if recipe.family.name == "sd3":
        pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(pipelines[model], transformer=None, vae=None)
        tokens, _, pooled, _ = pipe.encode_prompt([texts[5], texts[0]], None, None, device="cpu",
                                                  do_classifier_free_guidance=False, max_sequence_length=8)
        empty, _, empty_pooled, _ = pipe.encode_prompt([""], None, None, device="cpu",
                                                       do_classifier_free_guidance=False, max_sequence_length=8)
        cond = family.condition(labels)
        close(cond["pooled_projections"], pooled)
        close(family.null_condition(1, "cpu")["pooled_projections"], empty_pooled)
    else:
        pipe = diffusers.CogVideoXPipeline.from_pretrained(pipelines[model], transformer=None, vae=None)
        tokens, _ = pipe.encode_prompt([texts[5], texts[0]], do_classifier_free_guidance=False,
                                       max_sequence_length=8, device="cpu")
        empty, _ = pipe.encode_prompt([""], do_classifier_free_guidance=False, max_sequence_length=8, device="cpu")
        cond = family.condition(labels)
    close(cond["encoder_hidden_states"], tokens)
    null = family.null_condition(2, "cpu")["encoder_hidden_states"]
    close(null, empty.expand(2, *empty.shape[1:]))
    # CFG dropout mixes the two row by row
    dropped = family.drop_condition(labels, torch.tensor([True, False]))["encoder_hidden_states"]
    close(dropped[0], empty[0])
    close(dropped[1], tokens[1])


def close(got, expected):
    """Equal up to the batch size's effect on the encoders' matmuls (the stream was encoded 64 prompts at a time)."""
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=0)


def test_prompt_stream_follows_its_file(pipelines, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    recipe = twin("sd3_medium_tiny", pipelines, tmp_path, f"family.prompts={prompts}")
    with pytest.raises(FileNotFoundError, match="no encoded prompts"):
        build_family(recipe)
    lines = []
    prepare_prompts(recipe, recipe.run.dir, SINGLE, lines.append)
    assert build_family(recipe).num_prompts == 2
    prepare_prompts(recipe, recipe.run.dir, SINGLE, lines.append)
    assert "encoded already" in lines[-1]
    prompts.write_text("a cat\na dog\na bird\n")   # edited after encoding: encoded again, never mixed
    prepare_prompts(recipe, recipe.run.dir, SINGLE, lines.append)
    assert any("encoding again" in line for line in lines)
    family = build_family(recipe)
    assert family.num_prompts == 3 and family.prompts.texts([2, 0]) == ["a bird", "a cat"]
    wrong = twin("sd3_medium_tiny", pipelines, tmp_path, f"family.prompts={prompts}", "family.prompt_length=6",
                 f"run.dir={tmp_path / 'other'}")
    with pytest.raises(ValueError, match="prompt_length must equal"):
        prepare_prompts(wrong, wrong.run.dir, SINGLE, lines.append)


def test_cogvideox_shapes_and_bad_sizes(pipelines, tmp_path):
    family = build_family(twin("cogvideox_2b_tiny", pipelines, tmp_path))
    assert family.data_shape == (3, 16, 8, 8)          # 9 frames -> 3 latent frames, 64 px -> 8, channels second
    assert family.tap_shapes()[0] == (16, 3, 4, 4)     # 2 heads x 8, frames, 8 / patch 2
    with pytest.raises(ValueError, match="4k \\+ 1"):
        build_family(twin("cogvideox_2b_tiny", pipelines, tmp_path, "family.frames=8"))
