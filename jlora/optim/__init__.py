"""How adapters train: Optax transformations, loss wrappers and searches.

Each name below is defined in one private module (``jlora/optim/_bar.py``, ...)
and re-exported here once; import it from ``jlora.optim``.

* ``adalora`` / ``adalora_orthogonality`` / ``budget``: AdaLoRA's rank allocator
  and regulariser (``_adalora.py``).
* ``lora_plus``: LoRA+, a larger learning rate for ``b`` (``_lora_plus.py``).
* ``flat_lora`` / ``noise_scale``: Flat-LoRA's random perturbation of the merged
  weights (``_flat_lora.py``).
* ``mezo_sgd`` / ``mezo_gradient``: MeZO zero-order SPSA estimates (``_mezo.py``).
* ``bar``, ``sam_gradient``, ``sam_drift``, ``balance``, ``balora``,
  ``balancedness``: balancedness of LoRA factors (``_bar.py``).
* ``flora``: FLORA momentum compressed by random projections (``_flora.py``).
* ``glora_sample``, ``glora_search``, ``glora_fix``, ...: GLoRA's supernet
  sampling and evolutionary configuration search (``_glora.py``).
* ``fedadam`` / ``fedyogi`` / ``fedadagrad``, ``mime_client`` / ``mime_server``,
  ``fedlada_client`` / ``fedlada_server``, ``fedsps`` / ``feddecsps``: federated
  optimizers over the pseudo-gradient (``server_step``, ``merged_step``,
  ``communication_bytes``; ``_fedopt.py``).
* ``sam_select`` / ``sam_scores``: Fu et al.'s second-order approximation
  method choosing the entries ``jlora.Sparse`` trains (``_sparse.py``).

``docs/methods.md`` states the math and source paper of each single-model tool
above; the federated optimizers cite theirs in ``_fedopt.py``.
"""

from jlora.optim._adalora import AdaLoRAState, adalora, adalora_orthogonality, budget
from jlora.optim._bar import balance, balancedness, balora, bar, sam_drift, sam_gradient
from jlora.optim._fedopt import (Communication, FedDecSPSState, FedLADAServerState,
                                 FedLADAState, MimeState, ScaleByFedOptState,
                                 communication_bytes, fedadagrad, fedadam, feddecsps,
                                 fedlada_client, fedlada_offset, fedlada_server, fedsps,
                                 fedyogi, merged_step, mime_client, mime_gradient,
                                 mime_server, pseudo_gradient, scale_by_fedopt, server_step,
                                 tree_bytes)
from jlora.optim._flat_lora import flat_lora, noise_scale
from jlora.optim._flora import FloraState, flora, projection
from jlora.optim._glora import (GLoRASearchResult, glora_current, glora_describe, glora_fix,
                                glora_layers, glora_param_count, glora_sample, glora_search)
from jlora.optim._lora_plus import labels as lora_plus_labels
from jlora.optim._lora_plus import lora_plus
from jlora.optim._mezo import mezo_gradient, mezo_sgd, perturbation, projected_gradient
from jlora.optim._sparse import sam_scores, sam_select

__all__ = ["AdaLoRAState", "FloraState", "GLoRASearchResult", "adalora",
           "adalora_orthogonality", "balance", "balancedness", "balora", "bar", "budget",
           "flat_lora", "flora", "glora_current", "glora_describe", "glora_fix",
           "glora_layers", "glora_param_count", "glora_sample", "glora_search", "lora_plus",
           "lora_plus_labels", "mezo_gradient", "mezo_sgd", "noise_scale", "perturbation",
           "projected_gradient", "projection", "sam_drift", "sam_gradient", "sam_scores",
           "sam_select",
           "Communication", "FedDecSPSState", "FedLADAServerState", "FedLADAState", "MimeState",
           "ScaleByFedOptState", "communication_bytes", "fedadagrad", "fedadam", "feddecsps",
           "fedlada_client", "fedlada_offset", "fedlada_server", "fedsps", "fedyogi",
           "merged_step", "mime_client", "mime_gradient", "mime_server", "pseudo_gradient",
           "scale_by_fedopt", "server_step", "tree_bytes"]
