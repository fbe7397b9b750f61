"""LoRA+ (jlora/optim/_lora_plus.py) against float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from tests._refs import f64

from ._trees import small_tree


def test_lora_plus_scales_b_side_only():
    _, adapted = small_tree(jlora.DoRA(rank=3))
    trainable, _ = jlora.split(adapted)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 2.0), trainable)
    tx = jlora.optim.lora_plus(optax.sgd, lr=0.1, ratio=16)
    upd, _ = tx.update(grads, tx.init(trainable), trainable)
    node = upd["fc"]["kernel"]
    np.testing.assert_allclose(f64(node.a), -0.2, rtol=1e-6)       # lr
    np.testing.assert_allclose(f64(node.b), -3.2, rtol=1e-6)       # lr · ratio
    np.testing.assert_allclose(f64(node.m), -3.2, rtol=1e-6)       # 1-D adapter vector: fast
    np.testing.assert_allclose(f64(upd["head"]["kernel"].value), -0.2, rtol=1e-6)


def test_lora_plus_takes_a_schedule_for_lr():
    _, adapted = small_tree()
    trainable, _ = jlora.split(adapted)
    grads = jax.tree.map(jnp.ones_like, trainable)
    tx = jlora.optim.lora_plus(optax.sgd, lambda step: 0.1 * (step + 1), ratio=4)
    state = tx.init(trainable)
    _, state = tx.update(grads, state, trainable)  # step 0: lr 0.1
    upd, _ = tx.update(grads, state, trainable)    # step 1: lr 0.2, b side 0.8
    np.testing.assert_allclose(f64(upd["fc"]["kernel"].a), -0.2, rtol=1e-6)
    np.testing.assert_allclose(f64(upd["fc"]["kernel"].b), -0.8, rtol=1e-6)


@pytest.mark.parametrize("kwargs, option", [
    (dict(lr=0.0), "lr"), (dict(lr=-1e-3), "lr"), (dict(lr=float("nan")), "lr"),
    (dict(lr="1e-3"), "lr"), (dict(lr=1e-3, ratio=0.0), "ratio"),
    (dict(lr=1e-3, ratio=float("inf")), "ratio"), (dict(lr=1e-3, ratio=True), "ratio"),
])
def test_lora_plus_refuses_bad_options(kwargs, option):
    with pytest.raises(ValueError, match=f"jlora.optim.lora_plus: {option} must be"):
        jlora.optim.lora_plus(optax.sgd, **kwargs)
    with pytest.raises(ValueError, match="jlora.optim.lora_plus: make_optimizer must be callable"):
        jlora.optim.lora_plus(optax.sgd(0.1), lr=0.1)


def test_lora_plus_trains_full_vectors_at_lr_and_stacked_adapter_vectors_fast():
    params = {"fc": {"kernel": jnp.ones((3, 6, 4)), "bias": jnp.zeros(4)}}
    spec = jlora.Spec({"fc/kernel": jlora.DoRA(rank=2, expert_axis=0), "fc/bias": jlora.Full()})
    trainable, _ = jlora.split(jlora.apply(params, spec, key=jax.random.key(0)))
    grads = jax.tree.map(jnp.ones_like, trainable)
    tx = jlora.optim.lora_plus(optax.sgd, lr=0.1, ratio=16)
    upd, _ = tx.update(grads, tx.init(trainable), trainable)
    np.testing.assert_allclose(f64(upd["fc"]["bias"].value), -0.1, rtol=1e-6)  # Full(): lr
    node = upd["fc"]["kernel"]
    assert node.m.shape == (3, 4)  # one magnitude vector per expert: fast, as unstacked
    np.testing.assert_allclose(f64(node.m), -1.6, rtol=1e-6)
    np.testing.assert_allclose(f64(node.b), -1.6, rtol=1e-6)
    np.testing.assert_allclose(f64(node.a), -0.1, rtol=1e-6)


def test_lora_plus_gives_adalora_q_the_b_rate_as_peft_gives_lora_b():
    pytest.importorskip("peft")
    import torch
    from peft import AdaLoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    net = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 6)),
                         AdaLoraConfig(target_modules=["0"], init_r=4, target_r=2, total_step=10))
    opt = create_loraplus_optimizer(net, optimizer_cls=torch.optim.SGD, lr=0.1, loraplus_lr_ratio=16)
    names = {id(p): n for n, p in net.named_parameters()}
    peft_lr = {names[id(p)].split(".")[-2]: g["lr"] for g in opt.param_groups for p in g["params"]}
    assert peft_lr["lora_B"] == pytest.approx(1.6) and peft_lr["lora_A"] == pytest.approx(0.1)
    params = {"w": {"kernel": jnp.ones((8, 6))}}
    trainable, _ = jlora.split(jlora.apply(
        params, jlora.Spec({"w/kernel": jlora.AdaLoRA(init_rank=4, target_rank=2)}),
        key=jax.random.key(0)))
    tx = jlora.optim.lora_plus(optax.sgd, lr=0.1, ratio=16)
    upd, _ = tx.update(jax.tree.map(jnp.ones_like, trainable), tx.init(trainable), trainable)
    node = upd["w"]["kernel"]
    np.testing.assert_allclose(f64(node.q), -peft_lr["lora_B"], rtol=1e-6)  # q = lora_Bᵀ
    np.testing.assert_allclose(f64(node.p), -peft_lr["lora_A"], rtol=1e-6)  # p = lora_Aᵀ
    # λ: a 1-D vector here, fast as DoRA's m (PEFT's lora_E is (r, 1), so it gets lr)
    np.testing.assert_allclose(f64(node.lam), -1.6, rtol=1e-6)
