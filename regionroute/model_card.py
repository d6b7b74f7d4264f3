"""The model card (``README.md``) of a trained model directory, written by the ``train`` stage.

As diffusers' LoRA training scripts write theirs (``huggingface_hub.ModelCard`` from a template, YAML front
matter with ``base_model``, ``library_name: diffusers``, the base model's ``license`` and the tags), so that
``models/regionroute`` can be uploaded to a model hub as is (``hf upload <user>/<repo> models/regionroute .``).
Entry point :func:`write_model_card`; docs/method.md §5, "Export". The body gives the instruction template,
how to load each expert with ``load_lora_weights`` and the training parameters. Nothing in it depends on
the time or the machine: identical training gives identical bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["BASE_LICENSES", "base_license", "write_model_card"]

#: Licence metadata of base models whose card may not be in the cache (``hf download --include`` skips it).
BASE_LICENSES: dict[str, dict[str, str]] = {
    "black-forest-labs/FLUX.1-Kontext-dev": {
        "license": "other",
        "license_name": "flux-1-dev-non-commercial-license",
        "license_link": "https://huggingface.co/black-forest-labs/FLUX.1-Kontext-dev/blob/main/LICENSE.md",
    }
}
#: The project's own licence: the base of ``tiny`` / ``toy`` models (built or trained by this project).
PROJECT_LICENSE = {"license": "apache-2.0"}
_KEYS = ("license", "license_name", "license_link")

TEMPLATE = """---
{{ card_data }}
---

# RegionRoute experts for {{ base_model }}

One LoRA expert per style for [{{ base_model }}]({{ base_link }}), trained with RegionRoute
(a LoRA mixture of experts on the double- and single-stream attention, with the Focus and Cover losses
pulling the style word's attention onto the object): asked *{{ example }}*, the edit restyles the named
object and keeps the rest of the image, with no mask at inference.

Styles: {{ styles | join(", ") }}. Instruction template: `{{ instruction }}` (T5 text length
{{ train.max_sequence_length }}, as trained).

## Use with diffusers

```python
import torch
from diffusers import FluxKontextPipeline
from diffusers.utils import load_image

pipe = FluxKontextPipeline.from_pretrained("{{ base_model }}", torch_dtype=torch.bfloat16).to("cuda")
{% for style in styles -%}
pipe.load_lora_weights(
    "<this repository or folder>", subfolder="lora", weight_name="{{ style }}.safetensors", adapter_name="{{ style }}"
)
{% endfor -%}
pipe.set_adapters("{{ styles[0] }}")  # one expert at a time: the one of the instruction's style
image = pipe(
    image=load_image("photo.jpg"),
    prompt="{{ example }}",
    guidance_scale=3.5,
    max_sequence_length={{ train.max_sequence_length }},
).images[0]
```

Each `lora/<style>.safetensors` is a standard diffusers LoRA (peft keys `transformer.<module>.lora_A/B.weight`,
rank {{ lora.rank }}, scale folded into B). With this project installed,
`regionroute edit photo.jpg --object dog --style {{ styles[0] }} --model <folder> --out dog.png` does the same
and saves the style word's attention map (`--attention-png`). `moe/` holds the whole mixture (routing
{{ lora.routing }}) and `regionroute.json` the configuration below.

## Training

| parameter | value |
|---|---|
{% for name, value in training -%}
| {{ name }} | {{ value }} |
{% endfor %}
## License

The experts are a derivative of {{ base_model }}: its licence applies{% if license_link %}
([{{ license_name or license }}]({{ license_link }})){% else %} ({{ license }}){% endif %}.
"""


def _training_rows(config: dict[str, Any]) -> list[tuple[str, str]]:
    """The training parameters of ``regionroute.json`` as (name, value) rows of the card's table."""
    lora, loss, train = config["lora"], config["loss"], config["train"]
    h, w = config["latent_hw"]
    f = int(config.get("vae_scale_factor", 8))  # FLUX's VAE: 8; the toy latent: 4
    streams = [f"{s}-stream {', '.join(lora[f'{s}_targets'])}" for s in ("double", "single") if lora[f"{s}_stream"]]
    return [
        ("base model", f"{config['base_model']} ({config.get('dtype', 'float32')})"),
        ("training resolution", f"{w * f} x {h * f} px ({h // 2} x {w // 2} tokens)"),
        ("experts", f"{len(config['styles'])}, rank {lora['rank']}, alpha {lora['alpha']}, init {lora['init']}, "
                    f"{lora['dtype']}, routing {lora['routing']}"),
        ("targets", "; ".join(streams)),
        ("steps", f"{train['steps']} x batch {train['batch_size']} x accumulation {train['gradient_accumulation']} "
                  f"x {config['processes']} process(es)"),
        ("optimizer", f"{train['optimizer']}, learning rate {train['learning_rate']} ({train['lr_scheduler']}, "
                      f"warm-up {train['lr_warmup_steps']}), weight decay {train['weight_decay']}"),
        ("precision", f"{train['mixed_precision']} mixed precision, gradient checkpointing "
                      f"{'on' if train['gradient_checkpointing'] else 'off'}, max grad norm {train['max_grad_norm']}"),
        ("loss", f"flow matching (weighting {train['weighting_scheme']}, object weight {loss['object_weight']}) "
                 f"+ Focus {loss['focus_weight']} + Cover {loss['cover_weight']} ({loss['direction']})"),
        ("guidance in training, seed", f"{train['guidance']}, {train['seed']}"),
    ]  # fmt: skip


def base_license(base_model: str) -> dict[str, str]:
    """Licence metadata of ``models.kontext``: from its card's front matter when on disk, else known values."""
    from huggingface_hub import ModelCard

    from regionroute.config import ModelsConfig
    from regionroute.models.kontext import kontext_source

    if base_model in ("tiny", "toy"):
        return dict(PROJECT_LICENSE)
    if not base_model.strip():
        return {"license": "other"}

    source = kontext_source(ModelsConfig(kontext=base_model))
    readme = Path(source) / "README.md" if Path(source).is_dir() else None
    if readme is None:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(base_model, "README.md")
        readme = Path(found) if isinstance(found, str) else None
    if readme is not None and readme.is_file():
        data = ModelCard.load(readme).data.to_dict()
        meta = {k: str(data[k]) for k in _KEYS if data.get(k)}
        link = meta.get("license_link", "")
        if link and "://" not in link and not Path(source).is_dir():  # relative to the base's repository
            meta["license_link"] = f"https://huggingface.co/{base_model}/blob/main/{link}"
        if meta:
            return meta
    return dict(BASE_LICENSES.get(base_model, {"license": "other"}))


def write_model_card(model_dir: Path, config: dict[str, Any]) -> Path:
    """Write ``<model_dir>/README.md`` from the trained model's ``regionroute.json`` content; returns its path."""
    from huggingface_hub import ModelCard, ModelCardData

    base, styles = config["base_model"], list(config["styles"])
    licence = base_license(base)
    tags = ["diffusers", "diffusers-training", "lora", "flux", "flux-kontext", "image-to-image", "regionroute"]
    is_hub = base.count("/") == 1 and not Path(base).exists()
    card_data = ModelCardData(  # base_model only when it is a hub id (the hub validates it)
        base_model=base if is_hub else None, library_name="diffusers", pipeline_tag="image-to-image",
        tags=tags + styles, instance_prompt=config["instruction"], **licence,
    )  # fmt: skip
    card = ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        base_link=f"https://huggingface.co/{base}" if is_hub else base,
        example=config["instruction"].format(object="dog", style=styles[0]),
        training=_training_rows(config),
        **{k: config[k] for k in ("styles", "instruction", "lora", "train")},
        **{k: licence.get(k, "") for k in _KEYS},
    )
    path = Path(model_dir) / "README.md"
    card.save(path)
    return path
