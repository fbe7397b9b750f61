"""Optax transformations and loss wrappers for low-rank training.

* ``adalora`` / ``adalora_orthogonality``: AdaLoRA's rank allocator and regulariser.
* ``lora_plus``: LoRA+ (a larger learning rate for ``b``).
* ``flat_lora``: Flat-LoRA's random perturbation of the merged weights.
* ``mezo_sgd`` / ``mezo_gradient``: MeZO zero-order SPSA estimates.
* ``bar``, ``sam_gradient``, ``balance``, ``balora``: balancedness of LoRA factors.
* ``flora``: FLORA momentum compressed by random projections.
* ``fedadam`` / ``fedyogi`` / ``fedadagrad``, ``mime_client`` / ``mime_server``,
  ``fedlada_client`` / ``fedlada_server``, ``fedsps`` / ``feddecsps``: federated
  optimizers over the pseudo-gradient (``server_step``, ``merged_step``,
  ``communication_bytes``).
"""

from jlora.optim.adalora import AdaLoRAState, adalora, adalora_orthogonality, budget
from jlora.optim.bar import balance, balancedness, balora, bar, sam_gradient
from jlora.optim._fedopt import (Communication, FedDecSPSState, FedLADAServerState,
                                 FedLADAState, MimeState, ScaleByFedOptState,
                                 communication_bytes, fedadagrad, fedadam, feddecsps,
                                 fedlada_client, fedlada_offset, fedlada_server, fedsps,
                                 fedyogi, merged_step, mime_client, mime_gradient,
                                 mime_server, pseudo_gradient, scale_by_fedopt, server_step, tree_bytes)
from jlora.optim.flat_lora import flat_lora, noise_scale
from jlora.optim.flora import FloraState, flora, projection
from jlora.optim.lora_plus import lora_plus
from jlora.optim.mezo import mezo_gradient, mezo_sgd, perturbation, projected_gradient

__all__ = ["AdaLoRAState", "FloraState", "adalora", "adalora_orthogonality", "balance",
           "balancedness", "balora", "bar", "budget", "flat_lora", "flora", "projection",
           "sam_gradient",
           "lora_plus", "mezo_gradient", "mezo_sgd", "noise_scale", "perturbation",
           "projected_gradient",
           "Communication", "FedDecSPSState", "FedLADAServerState", "FedLADAState", "MimeState",
           "ScaleByFedOptState", "communication_bytes", "fedadagrad", "fedadam", "feddecsps",
           "fedlada_client", "fedlada_offset", "fedlada_server", "fedsps", "fedyogi",
           "merged_step", "mime_client", "mime_gradient", "mime_server", "pseudo_gradient", "scale_by_fedopt",
           "server_step", "tree_bytes"]
