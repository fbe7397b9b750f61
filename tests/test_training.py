"""Short training runs: LoRA through the Linen fast path lowers the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from experiments.models.decoder import DecoderLM, lm_loss


def test_decoder_lm_lora_training_lowers_loss():
    model = DecoderLM(vocab=32, d_model=32, n_layers=2, n_heads=2, max_len=16)
    # a learnable task: each sequence counts upward mod vocab
    start = jax.random.randint(jax.random.key(0), (16, 1), 0, 32)
    tokens = (start + jnp.arange(16)[None]) % 32
    params = model.init(jax.random.key(1), tokens)["params"]
    spec = jlora.Spec({
        "**/layers_*/{query,key,value,out,up,down}/kernel": jlora.LoRA(rank=4, alpha=8),
        "head/kernel": jlora.Full(),
    })
    adapted = jlora.apply(params, spec, key=jax.random.key(2))
    trainable, frozen = jlora.split(adapted)
    tx = optax.adam(1e-2)
    opt = tx.init(trainable)

    @jax.jit
    def step(t, opt, key):
        def loss_fn(t):
            logits = jlora.linen.apply(model, {"params": jlora.combine(t, frozen)}, tokens,
                                       dropout_key=key)
            return lm_loss(logits, tokens)

        loss, g = jax.value_and_grad(loss_fn)(t)
        u, opt = tx.update(g, opt)
        return optax.apply_updates(t, u), opt, loss

    losses = []
    for i in range(40):
        trainable, opt, loss = step(trainable, opt, jax.random.key(i))
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses
    # the frozen base is bit-identical after training
    jax.tree.map(np.testing.assert_array_equal, jlora.split(jlora.combine(trainable, frozen))[1], frozen)
    # serving: merged plain params reproduce the fast path
    served = jlora.merge(jlora.combine(trainable, frozen))
    np.testing.assert_allclose(model.apply({"params": served}, tokens),
                               jlora.linen.apply(model, {"params": jlora.combine(trainable, frozen)}, tokens),
                               rtol=1e-4, atol=1e-4)
