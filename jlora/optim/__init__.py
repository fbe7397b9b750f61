"""Optax transformations for low-rank training."""

from jlora.optim.adalora import AdaLoRAState, adalora, adalora_orthogonality, budget

__all__ = ["AdaLoRAState", "adalora", "adalora_orthogonality", "budget"]
