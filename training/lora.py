"""LoRA adapters (Hu et al., 2021) on the UNet, through PEFT, as diffusers' own training examples
attach them (``unet.add_adapter(LoraConfig(...))``).

``add_lora`` freezes the UNet and injects rank-r adapters into the attention projections that
``lora.targets`` names (for a video UNet, ``lora.layers`` picks its temporal or spatial
attention: SVD's camera-motion LoRAs train the temporal layers only, Blattmann et al., 2023,
section 4.5). It returns the adapter's parameters, the only ones the optimizer and the EMA see.

A checkpoint holds the adapter alone (``AdapterWeights``, ``EmaWeights``: tensors in
safetensors, never pickle). ``export`` writes ``pytorch_lora_weights.safetensors`` in diffusers'
format with PEFT's config as metadata, so ``pipe.load_lora_weights(folder)`` restores the exact
scale (alpha / rank) on a Stable Diffusion or SDXL pipeline; diffusers has no LoRA loader for
``StableVideoDiffusionPipeline``, and ``load_into(pipe, folder)`` reads the same file into any
pipeline's UNet. ``fused`` merges the adapter into a copy of the UNet (``lora.export_fused``).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os

import torch

WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
INFO_FILE = "winnow_lora.json"
TEMPORAL = ".temporal_transformer_blocks."


def target_modules(unet, lora, layers: str) -> list[str]:
    """The full names of the linear layers that get an adapter: ``lora.targets`` among ``layers``
    (all, temporal or spatial: ``lora.layers`` as the family resolves auto, ``Family.lora_layers``)."""
    names = []
    for name, module in unet.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if not any(name == t or name.endswith("." + t) for t in lora.targets):
            continue
        temporal = TEMPORAL in f".{name}"
        if (layers == "temporal" and not temporal) or (layers == "spatial" and temporal):
            continue
        names.append(name)
    if not names:
        raise ValueError(f"lora.targets {lora.targets} (layers: {layers}) match no linear layer of this UNet")
    return names


def lora_config(unet, lora, layers: str):
    from peft import LoraConfig

    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
                      lora_dropout=lora.dropout, init_lora_weights="gaussian",
                      target_modules=target_modules(unet, lora, layers))


def _inject(unet, config) -> None:
    if hasattr(unet, "add_adapter"):                   # diffusers' PeftAdapterMixin (UNet2DConditionModel)
        unet.add_adapter(config)
    else:                                              # the spatio-temporal UNet has no mixin: PEFT directly
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, unet)


def add_lora(unet, lora, layers: str, seed: int) -> list:
    """Freeze ``unet``, inject the adapter (its initial weights seeded by ``seed`` on every rank), and
    return the adapter's parameters."""
    unet.requires_grad_(False)
    config = lora_config(unet, lora, layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _inject(unet, config)
    unet.winnow_lora_config = config
    params = [p for _, p in adapter_params(unet).items()]
    for p in params:
        p.requires_grad_(True)
    return params


def adapter_params(unet) -> dict:
    """The adapter's parameters by PEFT's saved names (the adapter name dropped)."""
    return {n.replace(".default.", "."): p for n, p in unet.named_parameters() if ".lora_" in n}


class AdapterWeights:
    """A checkpoint entry (``training.checkpoint``'s states): the adapter's tensors only."""

    def __init__(self, unet):
        self.unet = unet

    def state_dict(self) -> dict:
        return {k: p.detach().cpu().clone() for k, p in adapter_params(self.unet).items()}

    def load_state_dict(self, state: dict) -> None:
        own = adapter_params(self.unet)
        if set(state) != set(own):
            raise ValueError(
                f"adapter weights do not fit this run's adapter ({len(set(state) ^ set(own))} names differ; "
                f"was lora.rank, targets or layers changed?)"
            )
        with torch.no_grad():
            for k, p in own.items():
                if tuple(state[k].shape) != tuple(p.shape):
                    raise ValueError(f"adapter weight {k}: shape {tuple(state[k].shape)}, this run's {tuple(p.shape)}")
                p.copy_(state[k])


class EmaWeights:
    """A checkpoint entry for an EMA of the adapter: ``EMAModel``'s own state (its shadow tensors and
    scalars), stored as JSON + safetensors."""

    def __init__(self, ema):
        self.ema = ema

    def state_dict(self) -> dict:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state)


def diffusers_state(unet) -> dict:
    """The adapter in diffusers' key format (what ``save_lora_weights`` expects)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def metadata(config) -> dict:
    """PEFT's config as the file's metadata, without dropout: it is for training, and a loaded
    adapter's dropout layer is left in training mode by pipelines that never call ``eval()``."""
    meta = {**config.to_dict(), "lora_dropout": 0.0}
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()
            if isinstance(v, (str, int, float, bool, list, set, dict)) or v is None}


def export(unet, folder: str, info: dict) -> str:
    """Write ``folder/pytorch_lora_weights.safetensors`` (diffusers' format, PEFT config as metadata)
    and ``folder/winnow_lora.json`` (base, rank, targets, steps)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    config = unet.winnow_lora_config
    os.makedirs(folder, exist_ok=True)
    # the UNet's part of the file is the same for every pipeline class: prefix "unet."
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        folder,
        unet_lora_layers=diffusers_state(unet),
        unet_lora_adapter_metadata=metadata(config),
        weight_name=WEIGHTS_FILE,
        safe_serialization=True,
    )
    with open(os.path.join(folder, INFO_FILE), "w", encoding="utf-8") as fh:
        json.dump({**info, "rank": config.r, "alpha": config.lora_alpha, "targets": sorted(config.target_modules),
                   "parameters": sum(p.numel() for p in adapter_params(unet).values())}, fh, indent=2)
    return os.path.join(folder, WEIGHTS_FILE)


def load_into(pipe, folder: str, adapter_name: str = "default") -> None:
    """Load an exported adapter onto ``pipe``: through diffusers' ``load_lora_weights`` where the
    pipeline has it (SD, SDXL), else (SVD) into ``pipe.unet`` with ``load_adapter``."""
    if hasattr(pipe, "load_lora_weights"):
        pipe.load_lora_weights(folder, weight_name=WEIGHTS_FILE, adapter_name=adapter_name)
    else:
        load_adapter(pipe.unet, folder, adapter_name)


def load_adapter(unet, folder: str, adapter_name: str = "default") -> None:
    """Inject the adapter exported to ``folder`` into ``unet`` with PEFT (any UNet; the config comes
    from the file's metadata)."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open

    path = os.path.join(folder, WEIGHTS_FILE)
    with safe_open(path, framework="pt") as fh:
        meta = json.loads((fh.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY, "{}"))
        state = {k[len("unet."):]: fh.get_tensor(k) for k in fh.keys() if k.startswith("unet.")}
    unet_state = convert_unet_state_dict_to_peft(state)
    unet_meta = {k[len("unet."):]: v for k, v in meta.items() if k.startswith("unet.")}
    if not unet_meta or not unet_state:
        raise ValueError(f"{path}: no UNet adapter with its config in the metadata; export it with winnow")
    fields = set(LoraConfig.__dataclass_fields__)
    config = LoraConfig(**{k: v for k, v in unet_meta.items() if k in fields})
    inject_adapter_in_model(config, unet, adapter_name=adapter_name)
    result = set_peft_model_state_dict(unet, unet_state, adapter_name=adapter_name)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{path}: {len(result.unexpected_keys)} weights fit no layer of this UNet")
    unet.eval()


def fused(unet):
    """A copy of ``unet`` with the adapter merged into its weights and the PEFT layers removed: a
    plain diffusers UNet again."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = copy.deepcopy(unet)
    for name, module in list(out.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, child, module.get_base_layer())
    for attr in ("peft_config", "winnow_lora_config"):
        if hasattr(out, attr):
            delattr(out, attr)
    if getattr(out, "_hf_peft_config_loaded", False):
        out._hf_peft_config_loaded = False
    return out.requires_grad_(False)


def use_adapter(unet, name: str) -> None:
    """Make the adapter loaded as ``name`` (``load_into(..., adapter_name=name)``) the one ``unet``
    computes with, among several loaded side by side (the camera-move LoRAs)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    missing = [m for m in layers if name not in m.lora_A]
    if not layers or missing:
        raise ValueError(f"no adapter {name!r} is loaded on this UNet (loaded: "
                         f"{sorted(layers[0].lora_A) if layers else 'none'})")
    for m in layers:
        m.set_adapter(name)


@contextlib.contextmanager
def adapters_disabled(unet):
    """Inside, ``unet`` computes as its base (every PEFT layer's adapter switched off, not
    removed); yields how many layers were switched (0: the UNet carries no adapter)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield len(layers)
    finally:
        for m in layers:
            m.enable_adapters(True)


__all__ = ["AdapterWeights", "EmaWeights", "INFO_FILE", "WEIGHTS_FILE", "adapters_disabled", "add_lora",
           "adapter_params", "export", "fused", "load_adapter", "load_into", "target_modules", "use_adapter"]
