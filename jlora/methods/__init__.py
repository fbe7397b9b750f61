"""One module per method; each a config (what a Spec maps to) and an adapter node.

Defining a config class and its node class registers the method in
``REGISTRY`` (see ``jlora/methods/base.py`` for the checklist).
"""

from jlora.methods._module import ModuleConfig, ModuleNode
from jlora.methods.adalora import AdaLoRA, AdaLoRANode
from jlora.methods.adaptformer import AdaptFormer, AdaptFormerNode
from jlora.methods.base import REGISTRY, AdapterNode, Config
from jlora.methods.dora import DoRA, DoRANode
from jlora.methods.feddpa import FedDPA, FedDPANode
from jlora.methods.full import Full, FullNode
from jlora.methods.glora import GLoRA, GLoRABiasNode, GLoRANode
from jlora.methods.loftq import LoftQ
from jlora.methods.lora import LoRA, LoRANode
from jlora.methods.pf2lora import PF2LoRA, PF2LoRANode
from jlora.methods.qlora import QLoRA, QLoRANode
from jlora.methods.reft import (ConsReFT, ConsReFTNode, LoReFT, LoReFTNode, MeFT, MeFTNode,
                                NoReFT, NoReFTNode)
from jlora.methods.sparse import Sparse, SparseNode
from jlora.methods.subspace import Subspace, SubspaceNode
from jlora.methods.trainable_tokens import TrainableTokens, TrainableTokensNode
from jlora.methods.vera import VeRA, VeRANode

__all__ = ["AdaLoRA", "AdaLoRANode", "AdaptFormer", "AdaptFormerNode", "ModuleConfig", "ModuleNode", "AdapterNode", "Config", "DoRA", "DoRANode", "FedDPA",
           "FedDPANode", "Full", "FullNode", "GLoRA", "GLoRABiasNode", "GLoRANode", "LoftQ", "LoRA",
           "LoRANode", "PF2LoRA", "PF2LoRANode", "QLoRA", "QLoRANode", "REGISTRY", "Sparse", "SparseNode",
           "Subspace", "SubspaceNode", "TrainableTokens", "TrainableTokensNode", "VeRA",
           "VeRANode"]
__all__ += ["ConsReFT", "ConsReFTNode", "LoReFT", "LoReFTNode", "MeFT", "MeFTNode", "NoReFT",
            "NoReFTNode"]
