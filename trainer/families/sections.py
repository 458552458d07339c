"""The `family:` section of a recipe, one class per family, picked by `family.name` (docs/recipes.md)."""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field

from trainer.sections import Section


class ToyFamilyConfig(Section):
    name: Literal["toy"] = "toy"
    dataset: Literal["digits", "grid25", "grid25u"] = "digits"
    hidden: int = Field(256, gt=0)
    depth: int = Field(4, gt=0)
    time_embed_dim: int = Field(64, gt=0)
    taps: list[int] = Field(default_factory=lambda: [1, 2, 3], description="block indices whose outputs feed heads")


class LatentFamilyConfig(Section):
    """What the latent families share (trainer/families/latent.py): prompts, the null branch, the heads."""
    prompts: Optional[str] = Field(None, description="a prompt file (.txt one per line, .jsonl, .parquet: column "
                                   "`prompt_column`), encoded by the teacher pipeline's text encoders into the stream "
                                   "<run.dir>/prompts/ before the first stage, or a prompt stream made beforehand by "
                                   "python -m trainer.prepare prompts (docs/data.md); default: a random embedding "
                                   "table (tiny twins, benchmarks)")
    prompt_column: str = Field("text", min_length=1, description="the prompts' column of a .jsonl / .parquet prompt file")
    prompt_dtype: Literal["float16", "float32"] = Field("float16", description="how the encoded prompt stream stores "
                                                        "the embeddings")
    num_prompts: int = Field(64, gt=0, le=4096, description="rows of the random embedding table without `prompts` "
                             "(held in memory: tiny twins and benchmarks only; real prompt sets are streamed)")
    prompt_seed: int = 0
    uncond: Literal["zeros", "empty_prompt"] = Field("zeros", description="the unconditional branch of CFG: zero "
                                                     "embeddings (DMD2) or the encoded empty prompt (needs prompts)")
    head_hidden: int = Field(128, gt=0, description="channels of each discriminator head's conv")


class SDXLFamilyConfig(LatentFamilyConfig):
    """SDXL's UNet (trainer/families/sdxl.py). The architecture comes from `teacher.pretrained` when it is a
    diffusers folder or hub id, else from the checked-in config `model` (`sdxl`, or the tiny twin `sdxl_tiny`)."""
    name: Literal["sdxl"] = "sdxl"
    model: Literal["sdxl", "sdxl_tiny"] = "sdxl"
    resolution: int = Field(1024, gt=0, multiple_of=8, description="pixels; latents are resolution / 8")
    prompt_length: int = Field(77, gt=0, description="tokens per prompt embedding")
    pixel_backbone: Literal["sam", "dinov2"] = Field("sam", description="ADP's pixel discriminator backbone "
                                                     "(docs/algorithms.md \"ADP\"): SAM's image encoder, or DINOv2")
    pixel_backbone_pretrained: Optional[str] = Field(
        None, description="local folder or cached hub id of the backbone (e.g. facebook/sam-vit-base, "
        "facebook/dinov2-base); default: the checked-in config with random weights (tiny twins only)")
    pixel_image_size: Optional[int] = Field(None, gt=0, description="the backbone's input size (decoded images are "
                                            "resized to it); default: the backbone's own (SAM 1024)")


class SD3FamilyConfig(LatentFamilyConfig):
    """SD3-Medium / SD3.5-Large's MMDiT (trainer/families/sd3.py): the pretrained folder's `transformer/` config, else
    the checked-in `model`."""
    name: Literal["sd3"] = "sd3"
    model: Literal["sd3_medium", "sd35_large", "sd3_medium_tiny", "sd35_large_tiny"] = "sd3_medium"
    resolution: int = Field(1024, gt=0, multiple_of=16, description="pixels; latents are resolution / 8")
    prompt_length: int = Field(333, gt=0, description="tokens per prompt: 77 CLIP + 256 T5 (the pipeline's default)")
    taps: Optional[list[int]] = Field(None, description="joint blocks whose image tokens feed the heads; default: the "
                                      "ends of 1/4, 1/2, 3/4 and all of the depth")


class CogVideoXFamilyConfig(LatentFamilyConfig):
    """CogVideoX-2B / 5B (trainer/families/cogvideox.py): the pretrained folder's `transformer/` config, else the
    checked-in `model`."""
    name: Literal["cogvideox"] = "cogvideox"
    model: Literal["cogvideox_2b", "cogvideox_5b", "cogvideox_2b_tiny", "cogvideox_5b_tiny"] = "cogvideox_2b"
    frames: int = Field(49, gt=0, description="video frames (4k + 1); latent frames are (frames - 1) / 4 + 1")
    height: int = Field(480, gt=0, multiple_of=16)
    width: int = Field(720, gt=0, multiple_of=16)
    prompt_length: Optional[int] = Field(None, gt=0, description="T5 tokens per prompt; default: the transformer's "
                                         "max_text_seq_length (226)")
    taps: Optional[list[int]] = Field(None, description="blocks whose video tokens feed the 3-D heads; default: the "
                                      "ends of 1/4, 1/2, 3/4 and all of the depth")


FamilyConfig = Annotated[Union[ToyFamilyConfig, SDXLFamilyConfig, SD3FamilyConfig, CogVideoXFamilyConfig],
                         Field(discriminator="name")]
