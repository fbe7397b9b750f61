"""jlora on Flax NNX state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jlora
from tests._refs import f64, perturb


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(6, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x)))


def test_paths_and_merge_give_a_working_model():
    graphdef, state = nnx.split(MLP(nnx.Rngs(0)))
    adapted = jlora.apply(state, jlora.Spec({"fc1/kernel": jlora.LoRA(rank=2, alpha=4),
                                             "fc2/kernel": jlora.Full()}), key=jax.random.key(1))
    paths = [p for p, x in jlora.tree.leaves_with_paths(adapted) if jlora.is_node(x)]
    assert paths == ["fc1/kernel", "fc2/kernel"]
    adapted = perturb(adapted)
    x = jax.random.normal(jax.random.key(2), (5, 6))
    y = jlora.nnx.merge(graphdef, adapted)(x)
    node = adapted["fc1"]["kernel"].get_value()
    w1 = f64(node.base) + 2.0 * f64(node.a) @ f64(node.b)
    b1 = f64(state["fc1"]["bias"].get_value())
    w2, b2 = f64(state["fc2"]["kernel"].get_value()), f64(state["fc2"]["bias"].get_value())
    ref = np.maximum(f64(x) @ w1 + b1, 0) @ w2 + b2
    np.testing.assert_allclose(f64(y), ref, rtol=1e-5, atol=1e-5)


def test_nnx_training_lowers_the_loss():
    graphdef, state = nnx.split(MLP(nnx.Rngs(0)))
    adapted = jlora.apply(state, jlora.Spec({"fc{1,2}/kernel": jlora.LoRA(rank=2)}),
                          key=jax.random.key(1))
    trainable, frozen = jlora.split(adapted)
    x = jax.random.normal(jax.random.key(2), (64, 6))
    y = jnp.sin(x[:, :3])
    tx = optax.adam(3e-2)
    opt = tx.init(trainable)

    def loss_fn(t):
        model = jlora.nnx.merge(graphdef, jlora.combine(t, frozen))
        return jnp.mean((model(x) - y) ** 2)

    @jax.jit
    def step(t, opt):
        loss, g = jax.value_and_grad(loss_fn)(t)
        u, opt = tx.update(g, opt)
        return optax.apply_updates(t, u), opt, loss

    losses = []
    for _ in range(60):
        trainable, opt, loss = step(trainable, opt)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    # the base never changed
    _, frozen_after = jlora.split(jlora.combine(trainable, frozen))
    np.testing.assert_array_equal(frozen_after["fc1"]["kernel"].get_value().base,
                                  state["fc1"]["kernel"].get_value())


import pytest  # noqa: E402


@pytest.mark.parametrize("config", [
    jlora.DoRA(rank=2), jlora.VeRA(rank=8), jlora.AdaLoRA(init_rank=3, target_rank=1),
    jlora.GLoRA(rank=2), jlora.LoRA(rank=2, init="pissa"),
])
def test_every_method_on_nnx_state(config):
    model = MLP(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    x = jax.random.normal(jax.random.key(2), (5, 6))
    adapted = jlora.apply(state, jlora.Spec({"fc1/kernel": config}), key=jax.random.key(1))
    # identity at init, through nnx.merge of the merged state
    np.testing.assert_allclose(f64(jlora.nnx.merge(graphdef, adapted)(x)), f64(model(x)),
                               rtol=1e-5, atol=1e-5)
    # after moving every trainable field, the module computes with the merged weights
    trainable, frozen = jlora.split(adapted)
    moved = jlora.combine(jax.tree.map(lambda t: t + 0.05, trainable), frozen)
    merged = jlora.merge(moved)
    w1, b1 = f64(merged["fc1"]["kernel"].get_value()), f64(merged["fc1"]["bias"].get_value())
    w2, b2 = f64(state["fc2"]["kernel"].get_value()), f64(state["fc2"]["bias"].get_value())
    ref = np.maximum(f64(x) @ w1 + b1, 0) @ w2 + b2
    y = jax.jit(lambda t: jlora.nnx.merge(graphdef, jlora.combine(t, frozen))(x))(
        jax.tree.map(lambda t: t + 0.05, trainable))
    np.testing.assert_allclose(f64(y), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- jlora.nnx.apply fast path


class Tagged(nnx.Module):
    """A Linear and an Embed whose calls forward keyword options (``out_sharding``)."""

    def __init__(self, rngs, **linear):
        self.fc = nnx.Linear(4, 6, rngs=rngs, **linear)
        self.emb = nnx.Embed(7, 6, rngs=rngs)

    def __call__(self, x, ids=None, **kw):
        y = self.fc(x, **kw)
        return y if ids is None else y + self.emb(ids, **kw)


def _tagged(config, **linear):
    graphdef, state = nnx.split(Tagged(nnx.Rngs(0), **linear))
    spec = jlora.Spec({"fc/kernel": config, "emb/embedding": jlora.LoRA(rank=2)})
    adapted = perturb(jlora.apply(state, spec, key=jax.random.key(1)), size=0.5)
    return graphdef, state, adapted


def _tagged_ref(state, adapted, x, ids, fc_input=None):
    """float64 ``x·(K0 + s·a·b) + bias (+ E[ids] + s·a[ids]·b)``; ``fc_input`` replaces
    ``x`` on the LoRA branch only (the dropped-out input)."""
    fc, emb = adapted["fc"]["kernel"].get_value(), adapted["emb"]["embedding"].get_value()
    x = f64(x)
    branch = x if fc_input is None else fc_input
    y = (x @ f64(fc.base) + fc.scale * (branch @ f64(fc.a)) @ f64(fc.b)
         + f64(state["fc"]["bias"].get_value()))
    if ids is None:
        return y
    table = f64(emb.base) + emb.scale * f64(emb.a) @ f64(emb.b)
    return y + table[np.asarray(ids)]


def test_nnx_apply_applies_lora_dropout_with_a_key():
    graphdef, state, adapted = _tagged(jlora.LoRA(rank=2, dropout=0.5))
    x = jax.random.normal(jax.random.key(2), (6, 4))
    ids = jnp.arange(6) % 7
    key = jax.random.key(7)
    keep = np.asarray(jax.random.bernoulli(jlora.tree.path_key(key, "fc/kernel"), 0.5, x.shape))
    dropped = np.where(keep, f64(x) / 0.5, 0.0)
    y = jlora.nnx.apply(graphdef, adapted, x, ids, dropout_key=key)
    np.testing.assert_allclose(f64(y), _tagged_ref(state, adapted, x, ids, dropped),
                               rtol=1e-5, atol=1e-5)
    # without a key (eval) the branch sees the whole input
    y0 = jlora.nnx.apply(graphdef, adapted, x, ids)
    np.testing.assert_allclose(f64(y0), _tagged_ref(state, adapted, x, ids), rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(f64(y) - f64(y0))) > 0.1


def test_nnx_apply_takes_out_sharding_like_the_layers():
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    graphdef, state, adapted = _tagged(jlora.LoRA(rank=2))
    x = jax.random.normal(jax.random.key(2), (4, 4))
    ids = jnp.arange(4) % 7
    want = _tagged_ref(state, adapted, x, ids)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Explicit,),
                         devices=jax.devices()[:2])
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
        y = jlora.nnx.apply(graphdef, adapted, xs, ids, out_sharding=P("data", None))
        assert y.sharding.spec == P("data", None)
    np.testing.assert_allclose(f64(y), want, rtol=1e-5, atol=1e-5)


def test_nnx_apply_keeps_preferred_element_type():
    graphdef, state, adapted = _tagged(jlora.LoRA(rank=2), dtype=jnp.bfloat16,
                                       param_dtype=jnp.bfloat16,
                                       preferred_element_type=jnp.float32)
    x = jax.random.normal(jax.random.key(2), (3, 4)).astype(jnp.bfloat16)
    plain = nnx.merge(graphdef, state)(x)
    fast = jlora.nnx.apply(graphdef, adapted, x)
    assert plain.dtype == jnp.float32 and fast.dtype == jnp.float32
    np.testing.assert_allclose(f64(fast), _tagged_ref(state, adapted, x, None), rtol=3e-2,
                               atol=3e-2)


# ------------------------------------------- Conv, Einsum, LinearGeneral on the fast path

from jax.extend import core as jcore  # noqa: E402


def _same_pads(size, k, stride):
    """lax's "SAME" padding of one spatial axis: ``(low, high)``."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def _patches(x, window, strides, padding):
    """float64 im2col of a channels-last ``x (B, *spatial, C)``: ``(B, *out, *window, C)``."""
    x = f64(x)
    n = len(window)
    if padding == "CIRCULAR":
        x = np.pad(x, [(0, 0)] + [((k - 1) // 2, k // 2) for k in window] + [(0, 0)], mode="wrap")
    elif padding == "SAME":
        x = np.pad(x, [(0, 0)] + [_same_pads(x.shape[1 + i], window[i], strides[i])
                                   for i in range(n)] + [(0, 0)])
    outs = [(x.shape[1 + i] - window[i]) // strides[i] + 1 for i in range(n)]
    p = np.zeros((x.shape[0], *outs, *window, x.shape[-1]))
    for o in np.ndindex(*outs):
        for w in np.ndindex(*window):
            src = tuple(o[i] * strides[i] + w[i] for i in range(n))
            p[(slice(None),) + o + w] = x[(slice(None),) + src]
    return p


def _conv_maps(window, strides, padding):
    """(forward, kernel gradient) of a stride/padding convolution, from im2col in float64."""
    n = len(window)
    sp, win = "hwz"[:n], "ijk"[:n]

    def fwd(x, w):
        return np.einsum(f"b{sp}{win}c,{win}co->b{sp}o", _patches(x, window, strides, padding), w)

    def grad(x, g):
        return np.einsum(f"b{sp}{win}c,b{sp}o->{win}co", _patches(x, window, strides, padding), g)
    return fwd, grad


def _einsum_maps(eq):
    xs, ks, outs = eq.replace("->", ",").split(",")
    return (lambda x, w: np.einsum(eq, f64(x), w),
            lambda x, g: np.einsum(f"{xs},{outs}->{ks}", f64(x), g))


def _general_maps(axis, n_in):
    """``nnx.LinearGeneral`` (no batch axes): contract ``axis`` of x with the kernel's first
    ``n_in`` axes; the output is x's other axes, then the kernel's output axes."""
    def fwd(x, w):
        ax = [a % x.ndim for a in axis]
        return np.tensordot(f64(x), w, axes=(ax, list(range(n_in))))

    def grad(x, g):
        ax = [a % x.ndim for a in axis]
        free = [i for i in range(x.ndim) if i not in ax]
        return np.tensordot(f64(x), g, axes=(free, list(range(len(free)))))
    return fwd, grad


# name -> (module builder, input shape, in_axes, numpy (forward, kernel gradient))
LAYERS = {
    "conv2d_same": (lambda **o: nnx.Conv(4, 6, (3, 3), padding="SAME", rngs=nnx.Rngs(0), **o),
                    (2, 5, 5, 4), (0, 1, 2), _conv_maps((3, 3), (1, 1), "SAME")),
    "conv1d_circular_stride2": (
        lambda **o: nnx.Conv(3, 5, 3, strides=2, padding="CIRCULAR", rngs=nnx.Rngs(0), **o),
        (2, 9, 3), (0, 1), _conv_maps((3,), (2,), "CIRCULAR")),
    "einsum_heads": (lambda **o: nnx.Einsum("btd,ndh->btnh", (3, 8, 4), (3, 4),
                                            rngs=nnx.Rngs(0), **o),
                     (2, 5, 8), (1,), _einsum_maps("btd,ndh->btnh")),
    "einsum_reordered": (lambda **o: nnx.Einsum("btd,dnh->nbth", (8, 3, 4), (3, 4),
                                                rngs=nnx.Rngs(0), **o),
                         (2, 5, 8), (0,), _einsum_maps("btd,dnh->nbth")),
    "linear_general": (lambda **o: nnx.LinearGeneral(8, (3, 4), rngs=nnx.Rngs(0), **o),
                       (2, 5, 8), (0,), _general_maps((-1,), 1)),
    "linear_general_two_axes": (
        lambda **o: nnx.LinearGeneral((2, 3), (4, 5), axis=(1, -1), rngs=nnx.Rngs(0), **o),
        (6, 2, 7, 3), (0, 1), _general_maps((1, -1), 2)),
}
METHODS = {"LoRA": lambda ax, **o: jlora.LoRA(rank=2, alpha=3, in_axes=ax, **o),
           "DoRA": lambda ax, **o: jlora.DoRA(rank=2, alpha=3, in_axes=ax, **o)}


def _matrix(k, in_axes):
    """A kernel as its ``(fan_in, fan_out)`` matrix, and the permutation that lays it out."""
    perm = tuple(in_axes) + tuple(i for i in range(k.ndim) if i not in in_axes)
    kt = np.transpose(k, perm)
    fan_in = int(np.prod([k.shape[i] for i in in_axes]))
    return kt.reshape(fan_in, -1), perm


def _kernel(m, shape, perm):
    return np.transpose(m.reshape([shape[i] for i in perm]), np.argsort(perm))


def _layer(name, method, **config):
    build, shape, in_axes, maps = LAYERS[name]
    graphdef, state = nnx.split(build())
    spec = jlora.Spec({"kernel": METHODS[method](in_axes, **config)})

    def adapt(state):  # one compile instead of an eager one per op
        adapted = perturb(jlora.apply(state, spec, key=jax.random.key(1)), size=0.5)
        if method == "DoRA":  # a magnitude away from the norms, so that m matters
            node = adapted["kernel"].get_value()
            adapted["kernel"].set_value(node.replace(m=node.m * jnp.linspace(0.5, 1.5,
                                                                             node.m.size)))
        return adapted
    x = jnp.asarray(np.random.default_rng(2).standard_normal(shape), jnp.float32)
    return graphdef, state, jax.jit(adapt)(state), x, in_axes, maps


def _reference(node, state, x, in_axes, maps, cotangent, *, branch_input=None):
    """float64 ``y = op(x, W) + bias`` with ``W = K0 + s·a·b`` (LoRA) or ``(K0 + s·a·b) ⊙
    m/‖·‖`` (DoRA, norms over each column of the (fan_in, fan_out) view), and the gradients
    of ``Σ cotangent ⊙ y`` w.r.t. ``a``, ``b`` (and ``m``; DoRA's norm detached, as its
    default). ``branch_input`` replaces ``x`` on the low-rank branch (dropout)."""
    fwd, grad = maps
    k0 = f64(state["kernel"].get_value())
    a, b, s = f64(node.a), f64(node.b), node.scale
    m0, perm = _matrix(k0, in_axes)
    v = m0 + s * a @ b
    bias = f64(state["bias"].get_value())
    c = f64(cotangent)
    if isinstance(node, jlora.methods.DoRANode):
        norm = np.sqrt(np.sum(v * v, axis=0) + 1e-24)
        ratio = f64(node.m) / norm
        w = _kernel(v * ratio, k0.shape, perm)
        y = fwd(x, w)
        g_w, _ = _matrix(grad(x, c), in_axes)  # dL/dW as a matrix
        g_v = g_w * ratio
        grads = {"a": s * g_v @ b.T, "b": s * a.T @ g_v, "m": np.sum(g_w * v, axis=0) / norm}
    else:
        y = fwd(x, k0)
        y = y + fwd(x if branch_input is None else branch_input, _kernel(s * a @ b, k0.shape, perm))
        g_w, _ = _matrix(grad(x, c), in_axes)
        grads = {"a": s * g_w @ b.T, "b": s * a.T @ g_w}
    return y, grads


def _bias_like(name, y):
    """The layer's bias as it broadcasts onto the output ``y``."""
    return {"einsum_reordered": lambda b: b.reshape(3, 1, 1, 4)}.get(name, lambda b: b)


def _kernel_products(fn, arg, shapes):
    """Arrays shaped like a kernel or its ``(fan_in, fan_out)`` matrix (any axis order) that
    ``fn``'s jaxpr computes from ``arg`` (the factors), after dropping the dead code (the
    merged copy the module holds for its own, unused ``__call__``)."""
    want = {tuple(sorted(s)) for s in shapes}
    found = []

    def walk(jaxpr, tainted, top):
        eqns = jaxpr.eqns
        if top:
            live = {v for v in jaxpr.outvars if isinstance(v, jcore.Var)}
            kept = []
            for eqn in reversed(eqns):
                if eqn.effects or any(v in live for v in eqn.outvars):
                    kept.append(eqn)
                    live.update(v for v in eqn.invars if isinstance(v, jcore.Var))
            eqns = kept[::-1]
        for eqn in eqns:
            ins = [v in tainted if isinstance(v, jcore.Var) else False for v in eqn.invars]
            if not any(ins):
                continue
            tainted.update(eqn.outvars)
            found.extend(f"{eqn.primitive.name} -> {v.aval.str_short()}" for v in eqn.outvars
                         if tuple(sorted(v.aval.shape)) in want)
            for sub in jcore.jaxprs_in_params(eqn.params):
                inner = (set(v for v, t in zip(sub.invars, ins) if t)
                         if len(sub.invars) == len(ins) else set(sub.invars))
                walk(sub, inner, False)

    closed = jax.make_jaxpr(fn)(arg)
    walk(closed.jaxpr, set(closed.jaxpr.invars), True)
    return found


def _fans(shape, in_axes):
    fan_in = int(np.prod([shape[i] for i in in_axes]))
    return (fan_in, int(np.prod(shape)) // fan_in)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", LAYERS)
def test_nnx_apply_factorizes_conv_einsum_and_linear_general(name, method):
    """Value and factor gradients against float64 numpy ``op(x, W)`` (``W`` from the formula;
    im2col for Conv, numpy einsum / tensordot for the others); neither the forward nor the
    gradient computes a kernel-shaped array from the factors (the delta ``s·a·b``, the
    merged kernel or an in×out weight gradient)."""
    graphdef, state, adapted, x, in_axes, maps = _layer(name, method)
    trainable, frozen = jlora.split(adapted)
    y = jax.jit(lambda a: jlora.nnx.apply(graphdef, a, x))(adapted)
    c = jnp.asarray(np.random.default_rng(5).standard_normal(y.shape), jnp.float32)
    want_y, want_g = _reference(adapted["kernel"].get_value(), state, x, in_axes, maps, c)
    want_y = want_y + _bias_like(name, want_y)(f64(state["bias"].get_value()))
    np.testing.assert_allclose(f64(y), want_y, rtol=1e-5, atol=1e-5)

    def loss(t):
        return jnp.sum(c * jlora.nnx.apply(graphdef, jlora.combine(t, frozen), x))

    g = jax.jit(jax.grad(loss))(trainable)["kernel"].get_value()
    for field, want in want_g.items():
        np.testing.assert_allclose(f64(getattr(g, field)), want, rtol=1e-4, atol=1e-5,
                                   err_msg=field)
    shape = tuple(state["kernel"].get_value().shape)
    shapes = [shape, _fans(shape, in_axes)]
    fwd = lambda t: jlora.nnx.apply(graphdef, jlora.combine(t, frozen), x)
    assert _kernel_products(fwd, trainable, shapes) == []
    assert _kernel_products(jax.grad(loss), trainable, shapes) == []
    # the probe sees a merged kernel: the generic path forms it
    merged = lambda t: jlora.nnx.merge(graphdef, jlora.combine(t, frozen))(x)
    assert _kernel_products(merged, trainable, shapes)


# one of each kind, for the checks that do not depend on the layer's options
KINDS = ["conv1d_circular_stride2", "einsum_reordered", "linear_general_two_axes"]


@pytest.mark.parametrize("name", KINDS)
def test_nnx_apply_drops_out_the_branch_input_on_every_layer(name):
    """``y = op(x, K0) + s·op(drop(x), a)·b``: the mask is drawn from
    ``path_key(dropout_key, "kernel")`` over the layer's input, as on ``nnx.Linear``."""
    graphdef, state, adapted, x, in_axes, maps = _layer(name, "LoRA", dropout=0.5)
    key = jax.random.key(7)
    keep = np.asarray(jax.random.bernoulli(jlora.tree.path_key(key, "kernel"), 0.5, x.shape))
    dropped = np.where(keep, f64(x) / 0.5, 0.0)
    run = jax.jit(lambda a, k: jlora.nnx.apply(graphdef, a, x, dropout_key=k))
    y = run(adapted, key)
    c = np.zeros(y.shape)
    node = adapted["kernel"].get_value()
    want, _ = _reference(node, state, x, in_axes, maps, c, branch_input=dropped)
    want = want + _bias_like(name, want)(f64(state["bias"].get_value()))
    np.testing.assert_allclose(f64(y), want, rtol=1e-5, atol=1e-5)
    y0 = jax.jit(lambda a: jlora.nnx.apply(graphdef, a, x))(adapted)  # eval: no dropout
    assert np.max(np.abs(f64(y) - f64(y0))) > 0.1


def _ops(fn, *args):
    """Every conv / dot_general equation in ``fn``'s jaxpr, nested ones included."""
    out = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
                out.append(eqn)
            for sub in jcore.jaxprs_in_params(eqn.params):
                walk(sub)
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return out


@pytest.mark.parametrize("name", KINDS)
def test_nnx_fast_path_keeps_precision_and_preferred_element_type(name):
    """The layer's ``precision`` and ``preferred_element_type`` reach both the base product
    and the down-projection ``op(x, a)``; bf16 in, float32 out as the plain layer."""
    build, shape, in_axes, maps = LAYERS[name]
    opts = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    graphdef, state = nnx.split(build(**opts))
    spec = jlora.Spec({"kernel": jlora.LoRA(rank=2, in_axes=in_axes)})
    adapted = jax.jit(lambda s: perturb(jlora.apply(s, spec, key=jax.random.key(1)),
                                        size=0.5))(state)
    x = jnp.asarray(np.random.default_rng(2).standard_normal(shape), jnp.bfloat16)
    fast = jax.jit(lambda a: jlora.nnx.apply(graphdef, a, x))(adapted)
    assert nnx.merge(graphdef, state)(x).dtype == jnp.float32 and fast.dtype == jnp.float32
    merged = jax.jit(lambda a: jlora.nnx.merge(graphdef, a)(x))(adapted)
    np.testing.assert_allclose(f64(fast), f64(merged), rtol=3e-2, atol=3e-2)
    layer_ops = [e for e in _ops(lambda a: jlora.nnx.apply(graphdef, a, x), adapted)
                 if "HIGHEST" in str(e.params.get("precision"))
                 and e.params.get("preferred_element_type") == jnp.float32]
    kernels = {tuple(e.invars[1].aval.shape) for e in layer_ops}
    k0 = tuple(state["kernel"].get_value().shape)  # these layers' input axes come first
    assert k0 in kernels, kernels  # op(x, K0)
    assert k0[:len(in_axes)] + (2,) in kernels, kernels  # op(x, a): a rank-2 kernel


class Trio(nnx.Module):
    """A Conv, an Einsum contracting its kernel's middle axis and a two-axis LinearGeneral."""

    def __init__(self, rngs, eq="btd,ndh->btnh", kernel=(2, 8, 4), **conv):
        self.conv = nnx.Conv(3, 8, 3, rngs=rngs, **conv)                        # (B, T, 8)
        self.ein = nnx.Einsum(eq, kernel, (2, 4), rngs=rngs)                    # (B, T, 2, 4)
        self.lg = nnx.LinearGeneral((2, 4), 5, axis=(-2, -1), rngs=rngs)        # (B, T, 5)

    def __call__(self, x):
        return self.lg(jnp.tanh(self.ein(jnp.tanh(self.conv(x)))))


TRIO_X = jnp.asarray(np.random.default_rng(3).standard_normal((3, 6, 3)), jnp.float32)
TRIO_SPEC = jlora.Spec({"*/kernel": jlora.LoRA(rank=2, alpha=3)})


def test_nnx_resolve_orients_each_kernel_as_its_layer_contracts_it():
    graphdef, state = nnx.split(Trio(nnx.Rngs(0)))
    spec = jlora.nnx.resolve(graphdef, state, TRIO_X, spec=TRIO_SPEC)
    assert [spec.match(f"{m}/kernel").in_axes for m in ("conv", "ein", "lg")] == [
        (0, 1), (1,), (0, 1)]
    # a config that says otherwise, or a spec that is not one, is refused
    with pytest.raises(ValueError, match=r"ein/kernel: the config says in_axes=\(0, 1\) but "
                                         r"the layer contracts kernel axes \(1,\)"):
        jlora.nnx.resolve(graphdef, state, TRIO_X, spec=jlora.Spec(
            {"ein/kernel": jlora.LoRA(rank=2, in_axes=(0, 1))}))
    with pytest.raises(ValueError, match="jlora.nnx.resolve: spec must be a jlora.Spec"):
        jlora.nnx.resolve(graphdef, state, TRIO_X, spec={"*/kernel": jlora.LoRA(rank=2)})


def test_nnx_resolved_einsum_runs_factorized_and_a_default_one_merged_but_exact():
    """``"btd,ndh->btnh"`` contracts kernel axis 1. With the default in_axes ``(0, 1)`` the
    adapter is a low-rank update of another matrix: ``apply`` serves it from the merged
    kernel (the probe sees it formed), still equal to the merged model; resolved, no
    kernel-shaped array is computed from the factors."""
    graphdef, state = nnx.split(Trio(nnx.Rngs(0)))
    shapes = [(2, 8, 4), (8, 8), (16, 4)]
    for spec, formed in ((TRIO_SPEC, True),
                         (jlora.nnx.resolve(graphdef, state, TRIO_X, spec=TRIO_SPEC), False)):
        adapted = jax.jit(lambda s: perturb(jlora.apply(s, spec, key=jax.random.key(1)),
                                            size=0.5))(state)
        trainable, frozen = jlora.split(adapted)
        fast = jax.jit(lambda a: jlora.nnx.apply(graphdef, a, TRIO_X))(adapted)
        merged = jax.jit(lambda a: jlora.nnx.merge(graphdef, a)(TRIO_X))(adapted)
        np.testing.assert_allclose(f64(fast), f64(merged), rtol=1e-5, atol=1e-5)
        run = lambda t: jlora.nnx.apply(graphdef, jlora.combine(t, frozen), TRIO_X)
        assert bool(_kernel_products(run, trainable, shapes)) == formed


def test_nnx_mixed_batch_runs_conv_einsum_and_linear_general():
    """``compose.stack`` adapters on all three layers: example ``j`` equals the model merged
    with adapter ``ids[j]`` (the base for -1); a masked Conv has no factorized form, and a
    stacked adapter no merged one: a ValueError names the layer. (Stacking needs the
    input axes first: the einsum's kernel is ``(d, n, h)`` here.)"""
    ein = dict(eq="btd,dnh->btnh", kernel=(8, 2, 4))
    graphdef, state = nnx.split(Trio(nnx.Rngs(0), **ein))
    spec = jlora.Spec({"ein/kernel": jlora.LoRA(rank=2, alpha=3, in_axes=(0,)),
                       "*/kernel": jlora.LoRA(rank=2, alpha=3)})
    trees = [jax.jit(lambda s, i=i: perturb(jlora.apply(s, spec, key=jax.random.key(i)),
                                            seed=i, size=0.5))(state) for i in range(2)]
    ids = jnp.array([1, -1, 0])
    got = jax.jit(lambda s: jlora.nnx.apply(graphdef, s, TRIO_X, adapter_ids=ids))(
        jlora.compose.stack(trees))
    for j, g in enumerate(np.asarray(ids)):
        tree = state if g < 0 else jlora.merge(trees[g])
        want = nnx.merge(graphdef, tree)(TRIO_X[j:j + 1])[0]
        np.testing.assert_allclose(f64(got[j]), f64(want), rtol=1e-5, atol=1e-5)
    mask = jnp.ones((3, 3, 8)).at[0].set(0.0)
    graphdef, state = nnx.split(Trio(nnx.Rngs(0), mask=mask, **ein))
    trees = [jlora.apply(state, spec, key=jax.random.key(i)) for i in range(2)]
    with pytest.raises(ValueError, match="conv/kernel: a stacked adapter runs only on the fast "
                                         "path, which this Conv call is not on"):
        jlora.nnx.apply(graphdef, jlora.compose.stack(trees), TRIO_X, adapter_ids=ids)


@pytest.mark.parametrize("conv", [{"mask": jnp.tril(jnp.ones((3, 4, 6)))},
                                  {"feature_group_count": 2}])
def test_nnx_masked_or_grouped_conv_is_served_merged_and_exact(conv):
    """``(K0 + s·a·b) ⊙ M`` and a grouped kernel have no factorized form: the layer runs on
    its merged kernel, against float64 im2col of ``K0 + s·a·b`` (⊙ M, or per group)."""
    graphdef, state = nnx.split(nnx.Conv(4, 6, 3, padding="VALID", rngs=nnx.Rngs(0), **conv))
    adapted = perturb(jlora.apply(state, jlora.Spec({"kernel": jlora.LoRA(rank=2)}),
                                  key=jax.random.key(1)), size=0.5)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 7, 4)), jnp.float32)
    with pytest.warns(UserWarning, match=r"jlora.nnx.apply: served from merged weights, not "
                                         r"factorized: kernel \(a Conv with feature_group_count"):
        y = jlora.nnx.apply(graphdef, adapted, x)
    with pytest.raises(ValueError, match=r"served from merged weights.*kernel \(a Conv"):
        jlora.nnx.apply(graphdef, adapted, x, strict=True)
    assert jlora.nnx.consumed(graphdef, adapted, x) == {"factorized": [], "merged": ["kernel"]}
    node = adapted["kernel"].get_value()
    w = f64(node.base) + node.scale * (f64(node.a) @ f64(node.b)).reshape(node.shape)
    p = _patches(x, (3,), (1,), "VALID")  # (B, out, 3, 4)
    if "mask" in conv:
        want = np.einsum("bowc,wcf->bof", p, w * f64(conv["mask"]))
    else:  # two groups of 2 input channels, 3 output features each
        want = np.concatenate([np.einsum("bowc,wcf->bof", p[..., 2 * g:2 * g + 2],
                                         w[..., 3 * g:3 * g + 3]) for g in range(2)], -1)
    want = want + f64(state["bias"].get_value())
    np.testing.assert_allclose(f64(y), want, rtol=1e-5, atol=1e-5)


class _Block(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.fc(x))


class Scanned(nnx.Module):
    """Three ``_Block`` layers stacked by ``nnx.vmap`` (kernel ``(3, 4, 4)``), run by
    ``nnx.scan``."""

    def __init__(self):
        keys = jax.random.split(jax.random.key(0), 3)
        self.blocks = nnx.vmap(lambda k: _Block(nnx.Rngs(k)))(keys)

    def __call__(self, x):
        return nnx.scan(lambda x, block: block(x), in_axes=(nnx.Carry, 0),
                        out_axes=nnx.Carry)(x, self.blocks)


def test_nnx_resolve_shifts_a_scanned_stack_and_asks_for_expert_axis():
    """Each layer sees one ``(4, 4)`` slice: as one matrix the layer axis would be taken
    for input features, so the config must adapt it per slice, on the slice's axis 1."""
    graphdef, state = nnx.split(Scanned())
    x = jnp.ones((2, 4))
    with pytest.raises(ValueError, match=r"blocks/fc/kernel: the stored kernel \(3, 4, 4\) is "
                                         "stacked along axis 0"):
        jlora.nnx.resolve(graphdef, state, x,
                          spec=jlora.Spec({"blocks/fc/kernel": jlora.LoRA(rank=2)}))
    spec = jlora.nnx.resolve(graphdef, state, x, spec=jlora.Spec(
        {"blocks/fc/kernel": jlora.LoRA(rank=2, expert_axis=0)}))
    assert spec.match("blocks/fc/kernel").in_axes == (1,)


class _TiedHead(nnx.Module):
    """An embedding called on ids and read again, tied, by ``attend``."""

    def __init__(self, rngs):
        self.emb = nnx.Embed(10, 4, rngs=rngs)
        self.fc = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, ids):
        return self.emb.attend(self.fc(self.emb(ids)))


def test_nnx_apply_names_what_it_serves_merged_and_whose_dropout_does_not_run():
    """As ``jlora.linen.apply``: an adapter a call serves from merged weights (a tied
    ``attend``, a layer no known class holds) is named with the reason, with a note when
    a dropout key was given and its dropout does not run; ``strict`` raises; the merged
    output is still exact against float64 numpy."""
    graphdef, state = nnx.split(_TiedHead(nnx.Rngs(0)))
    spec = jlora.Spec({"emb/embedding": jlora.LoRA(rank=2, dropout=0.3),
                       "fc/kernel": jlora.LoRA(rank=2)})
    adapted = perturb(jlora.apply(state, spec, key=jax.random.key(1)), size=0.5)
    ids = jnp.array([[1, 2, 3]])
    assert jlora.nnx.consumed(graphdef, adapted, ids) == {
        "factorized": ["emb/embedding", "fc/kernel"], "merged": ["emb/embedding"]}
    with pytest.warns(UserWarning, match=r"emb/embedding \(nnx.Embed.attend has no factorized "
                                         r"form; its adapter dropout does not run\)") as got:
        jlora.nnx.apply(graphdef, adapted, ids, dropout_key=jax.random.key(2))
    assert "fc/kernel" not in str(got[0].message) and got[0].filename == __file__
    with pytest.raises(ValueError, match=r"emb/embedding \(nnx.Embed.attend"):
        jlora.nnx.apply(graphdef, adapted, ids, strict=True)
    with pytest.warns(UserWarning) as got:
        y = jlora.nnx.apply(graphdef, adapted, ids)
    assert "dropout" not in str(got[0].message)  # no key: nothing is dropped anywhere
    emb, fc = adapted["emb"]["embedding"].get_value(), adapted["fc"]["kernel"].get_value()
    table = f64(emb.base) + emb.scale * f64(emb.a) @ f64(emb.b)  # K0 + s·a·b
    kernel = f64(fc.base) + fc.scale * f64(fc.a) @ f64(fc.b)
    h = table[np.asarray(ids)] @ kernel + f64(adapted["fc"]["bias"].get_value())
    np.testing.assert_allclose(f64(y), h @ table.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="jlora.nnx.apply: strict must be a bool"):
        jlora.nnx.apply(graphdef, adapted, ids, strict="yes")
    # a mixed batch has no merged table for attend to read: refused, not the base alone
    trees = [jlora.apply(state, spec, key=jax.random.key(i)) for i in range(2)]
    with pytest.raises(ValueError, match="emb/embedding: a stacked adapter runs only on the "
                                         "fast path, which nnx.Embed.attend is not on"):
        jlora.nnx.apply(graphdef, jlora.compose.stack(trees), ids, adapter_ids=jnp.array([1]))



def test_qlora_on_a_kernel_whose_input_axes_do_not_lead_is_served_merged_and_named():
    # (n, d, h) with n == d: the square case, where a wrong layout would still run
    layer = nnx.Einsum("btd,ndh->btnh", (16, 16, 8), (16, 8), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    x = jax.random.normal(jax.random.key(5), (2, 3, 16))
    spec = jlora.nnx.resolve(graphdef, state, x,
                             spec=jlora.Spec({"kernel": jlora.QLoRA(rank=2, block_size=16)}))
    adapted = jlora.apply(state, spec, key=jax.random.key(1))
    node = adapted["kernel"].get_value()
    assert node.in_axes == (1,)
    node = node.replace(b=jax.random.normal(jax.random.key(2), node.b.shape))  # a trained b
    adapted["kernel"].set_value(node)
    with pytest.raises(ValueError, match="quantized base is packed in the kernel's layout"):
        jlora.nnx.apply(graphdef, adapted, x, strict=True)
    with pytest.warns(UserWarning, match="kernel.*quantized base"):
        y = jlora.nnx.apply(graphdef, adapted, x)
    k = f64(node.base) + node.scale * np.einsum("dr,rnh->ndh", f64(node.a),
                                                f64(node.b).reshape(2, 16, 8))
    ref = np.einsum("btd,ndh->btnh", f64(x), k) + f64(state["bias"].get_value())
    np.testing.assert_allclose(f64(y), ref, rtol=1e-5, atol=1e-5)
