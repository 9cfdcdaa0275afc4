"""CLIP in Flax: the model (`model.py`, its towers in `towers.py`, its configuration
in `configs.py`) and its checkpoint converters (`convert.py`).

`model.CLIP` holds both towers under fixed parameter paths (documented in
`model.py`) that quantization rules and the converters match. `convert`
reads a local Hugging Face CLIP folder (`convert.load`) or an OpenCLIP
safetensors file with its model-config JSON (`convert.load_open_clip`), and
writes both layouts back (`hf_from_params`, `open_clip_from_params`):

    from baq.models.clip import convert, logits
    model, variables, tokenizer = convert.load("/ckpt/clip-vit-base-patch32")
    image, text, scale = model.apply(variables, images, tokens)
    logits_per_image = logits(image, text, scale)

Only the checkpoint formats live in `convert`, so importing this package
(which the model registry's discovery does) reads no files.
"""

from baq.models.clip.configs import CLIPConfig, TextConfig, VisionConfig
from baq.models.clip.model import CLIP, l2_normalize, logits
from baq.models.clip.towers import eos_positions

__all__ = ["CLIP", "CLIPConfig", "TextConfig", "VisionConfig", "eos_positions", "l2_normalize",
           "logits"]
