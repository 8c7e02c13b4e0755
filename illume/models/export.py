"""A tuned VLM written as a folder that stock transformers (and PEFT) load: what `illume export-model` hands out.

`export_vlm` picks the backend's writer (`EXPORTERS`, by the VLM's class): the one place the backends differ here:

- `hf`: the LoRA as a PEFT adapter folder (`adapter_config.json` naming the base model, and
  `adapter_model.safetensors`) that `PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(BASE),
  OUT)` loads. A multimodal projector the run trained (`train.train_prefix`) is a change to base weights that
  LoRA cannot carry: it goes along as PEFT `modules_to_save`; any other trained base weight is refused (export
  with `merge`). With `merge`: the LoRA merged into the weights (`merge_and_unload`), a standalone
  `save_pretrained` folder. The processor is saved in both.
- `magma`: the whole model and its tokenizer (`MagmaVLM.save`). MAGMA's adapters are modules of the model, so
  they are in its weights already (`merge` changes nothing); its class is illume's, so transformers loads it
  once `illume.models.magma.register_magma()` has registered the architecture.

Every safetensors file gets its sha256 beside it (illume.models.weights), as everything illume writes.
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from peft import get_peft_model
from PIL import Image

from illume.models.hf import HFVLM, PROJECTOR_MODULES
from illume.models.vlm import MagmaVLM
from illume.models.weights import record_digests


class ModelExportError(ValueError):
    """A model that cannot be exported in the form asked for; the message says what would work."""


@dataclass
class ExportedModel:
    """What an exporter wrote, for the model card."""

    description: str
    """One line: what the folder holds."""
    library_name: str
    """The library that loads it (`library_name` of a Hugging Face model card): "peft" or "transformers"."""
    usage: str
    """Python that loads the folder and generates from it, with stock libraries."""
    base_model: str | None = None
    """The model it was tuned from, as a card's `base_model` names it (a hub name or a path); None: none that
    others could load by that name."""


def _shown_input(vlm, image: Image.Image, prompt: str) -> str:
    """The model's input for `prompt` as training built it (`encode_row`), each run of image tokens shown
    once: the text a processor expands again."""
    ids = vlm.encode_row(image, prompt)["input_ids"]
    collapsed = [t for i, t in enumerate(ids) if not (t == vlm.image_token_id and i and ids[i - 1] == t)]
    return vlm.tokenizer.decode(collapsed, skip_special_tokens=False)


def _projector_modules(trained: Collection[str]) -> list[str]:
    """The multimodal projector modules holding the trained base weights (those outside LoRA).

    Raises:
        ModelExportError: a trained weight outside LoRA and the projector.
    """
    modules = set()
    for name in sorted(n for n in trained if "lora_" not in n):
        module = next((m for m in PROJECTOR_MODULES if f".{m}." in f".{name}"), None)
        if module is None:
            raise ModelExportError(f"the run trained {name}, which is neither LoRA nor the multimodal projector: "
                                   "a PEFT adapter folder cannot carry it; export with --merge for a standalone "
                                   "model")
        modules.add(module)
    return sorted(modules)


def export_hf(vlm: HFVLM, out_dir: Path, *, base_model: str, merge: bool, trained: Collection[str],
              where: str, example: tuple[Image.Image, str]) -> ExportedModel:
    """Write `vlm` (a PEFT model with its tuned LoRA loaded) as a PEFT adapter folder, or merged with `merge`.

    The VLM is used up: its model is changed in place (the LoRA unloaded or merged).

    Args:
        base_model: What `adapter_config.json` names as the base (a hub name, or a local folder's absolute path).
        trained: Names of the weights the run trained (LoRA, and the projector with `train.train_prefix`).
        where: The folder's final path, for the usage snippet.
        example: An (image, prompt) whose model input the usage snippet shows.
    """
    model = vlm.model
    shown = _shown_input(vlm, *example)
    if merge:
        merged = model.merge_and_unload()
        merged.save_pretrained(out_dir)
        description = f"`{type(merged).__name__}` with the LoRA merged into its weights (standalone)"
        library = "transformers"
        load = f"model = AutoModelForImageTextToText.from_pretrained({where!r}).eval()"
        imports = "from transformers import AutoModelForImageTextToText, AutoProcessor"
    else:
        config = copy.deepcopy(model.peft_config["default"])
        config.base_model_name_or_path = base_model
        projectors = _projector_modules(trained)
        if projectors:
            # A fresh PeftModel whose projector is a `modules_to_save` copy of the trained one (the base holds
            # the trained weights now: the wrapper copies them), with the tuned LoRA copied back in.
            config.modules_to_save = sorted(set(config.modules_to_save or ()) | set(projectors))
            lora = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}
            model = get_peft_model(model.unload(), config)
            parameters = dict(model.named_parameters())
            missing = sorted(set(lora) - set(parameters))
            if missing:
                raise ModelExportError(f"the LoRA weights {missing[:3]} have no place in the exported adapter")
            for name, tensor in lora.items():
                parameters[name].data.copy_(tensor)
        else:
            model.peft_config["default"] = config
        model.save_pretrained(out_dir)
        description = (f"a PEFT LoRA adapter for `{base_model}`"
                       + (f" (with the trained {', '.join(projectors)} as `modules_to_save`)" if projectors else ""))
        library = "peft"
        load = (f"base = AutoModelForImageTextToText.from_pretrained({base_model!r})\n"
                f"model = PeftModel.from_pretrained(base, {where!r}).eval()")
        imports = "from peft import PeftModel\nfrom transformers import AutoModelForImageTextToText, AutoProcessor"
    vlm.processor.save_pretrained(out_dir)
    record_digests(out_dir)
    usage = f"""{imports}
from PIL import Image

{load}
processor = AutoProcessor.from_pretrained({where!r})
# The input as in training: the image placeholder, then ILLUME's plain-text prompt.
text = {shown!r}
inputs = processor(images=[Image.open("image.jpg").convert("RGB")], text=[text], return_tensors="pt")
tokens = model.generate(**inputs, max_new_tokens=24, do_sample=False)
print(processor.batch_decode(tokens[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))"""
    return ExportedModel(description, library, usage, base_model)


def export_magma(vlm: MagmaVLM, out_dir: Path, *, base_model: str, merge: bool, trained: Collection[str],
                 where: str, example: tuple[Image.Image, str]) -> ExportedModel:
    """Write the whole MAGMA model (its adapters are part of it) and its tokenizer (`MagmaVLM.save`).

    Args: as `export_hf` (`base_model`, `merge` and `trained` change nothing here).
    """
    vlm.save(out_dir)
    image, prompt = example
    ids = vlm.encode_row(image, prompt)["input_ids"]
    text = vlm.tokenizer.decode([t for t in ids if t != vlm.image_token_id])
    usage = f"""import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from illume.models.image_processing import to_pixel_values  # CLIP's resize, centre crop and normalisation
from illume.models.magma import register_magma  # MAGMA's architecture is illume's (pip install illume-vlm)

register_magma()
model = AutoModelForCausalLM.from_pretrained({where!r}).eval()
tokenizer = AutoTokenizer.from_pretrained({where!r})
# The input as in training: {vlm.model.config.num_image_tokens} image slots, then ILLUME's plain-text prompt.
ids = [model.config.image_token_id] * model.config.num_image_tokens + tokenizer(
    {text!r}, add_special_tokens=False)["input_ids"]
pixel_values = to_pixel_values([image], model.config.image_size)  # image: a PIL image
tokens = model.generate(input_ids=torch.tensor([ids]), pixel_values=pixel_values, max_new_tokens=24,
                        do_sample=False)
print(tokenizer.decode(tokens[0, len(ids):], skip_special_tokens=True))"""
    return ExportedModel("the whole MAGMA model (`MagmaForCausalLM`, adapters included) and its tokenizer",
                         "transformers", usage)


EXPORTERS = {MagmaVLM: export_magma, HFVLM: export_hf}
"""The VLM's class -> the function that writes a tuned VLM of that backend as a loadable folder."""


def export_vlm(vlm, out_dir: Path, **kwargs) -> ExportedModel:
    """Write `vlm` as a folder that stock transformers (and PEFT) load, by its backend's writer (`EXPORTERS`;
    keyword arguments as `export_hf`'s)."""
    exporter = EXPORTERS.get(type(vlm))
    if exporter is None:
        raise ModelExportError(f"no exporter for a {type(vlm).__name__}; one of {[c.__name__ for c in EXPORTERS]}")
    return exporter(vlm, out_dir, **kwargs)
