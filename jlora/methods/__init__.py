"""One module per method; each a config (what a Spec maps to) and an adapter node."""

from jlora.methods.adalora import AdaLoRA, AdaLoRANode
from jlora.methods.base import AdapterNode, Config
from jlora.methods.dora import DoRA, DoRANode
from jlora.methods.feddpa import FedDPA, FedDPANode
from jlora.methods.full import Full, FullNode
from jlora.methods.glora import GLoRA, GLoRABiasNode, GLoRANode
from jlora.methods.lora import LoRA, LoRANode
from jlora.methods.pf2lora import PF2LoRA, PF2LoRANode
from jlora.methods.qlora import QLoRA, QLoRANode
from jlora.methods.vera import VeRA, VeRANode

__all__ = ["AdaLoRA", "AdaLoRANode", "AdapterNode", "Config", "DoRA", "DoRANode", "FedDPA", "FedDPANode", "Full", "FullNode", "GLoRA", "GLoRABiasNode", "GLoRANode", "LoRA", "LoRANode", "PF2LoRA", "PF2LoRANode", "QLoRA", "QLoRANode", "VeRA", "VeRANode"]

import dataclasses as _dc

import jax.numpy as _jnp

#: method name -> (config class, node class); one entry per method file.
REGISTRY = {
    "LoRA": (LoRA, LoRANode),
    "DoRA": (DoRA, DoRANode),
    "Full": (Full, FullNode),
    "VeRA": (VeRA, VeRANode),
    "AdaLoRA": (AdaLoRA, AdaLoRANode),
    "GLoRA": (GLoRA, GLoRANode),
    "PF2LoRA": (PF2LoRA, PF2LoRANode),
    "FedDPA": (FedDPA, FedDPANode),
    "QLoRA": (QLoRA, QLoRANode),
}


def config_to_dict(config: Config) -> dict:
    """A JSON-ready description of a config (checkpoints carry their spec)."""
    name = type(config).__name__
    if name not in REGISTRY:
        raise ValueError(f"config {config!r} is not a registered jlora method")
    out = {"method": name}
    for f in _dc.fields(config):
        v = getattr(config, f.name)
        if f.name == "dtype" and v is not None:
            v = _jnp.dtype(v).name
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def config_from_dict(d: dict) -> Config:
    d = dict(d)
    name = d.pop("method", None)
    if name not in REGISTRY:
        raise ValueError(f"unknown jlora method {name!r}; known: {sorted(REGISTRY)}")
    if d.get("in_axes") is not None:
        d["in_axes"] = tuple(d["in_axes"])
    return REGISTRY[name][0](**d)
