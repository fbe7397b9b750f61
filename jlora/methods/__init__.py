"""One module per method; each a config (what a Spec maps to) and an adapter node."""

from jlora.methods.base import AdapterNode, Config
from jlora.methods.dora import DoRA, DoRANode
from jlora.methods.full import Full, FullNode
from jlora.methods.lora import LoRA, LoRANode

__all__ = ["AdapterNode", "Config", "DoRA", "DoRANode", "Full", "FullNode", "LoRA", "LoRANode"]
