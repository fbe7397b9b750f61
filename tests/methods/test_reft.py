"""LoReFT, NoReFT, ConsReFT and MeFT against float64 numpy references written from the formulas
(Wu et al. 2024, arXiv 2404.03592 eq. 2; pyreft's interventions and position rule)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora.methods import reft
from tests._refs import f64

D, R = 8, 3


def block_params(d=D, hidden=16, seed=0):
    rng = np.random.default_rng(seed)
    return {"ln": {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))},
            "fc1": {"kernel": jnp.asarray(rng.normal(size=(d, hidden)) / 3, jnp.float32)},
            "fc2": {"kernel": jnp.asarray(rng.normal(size=(hidden, d)) / 3, jnp.float32)}}


def hidden(shape=(3, 7, D), seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def ref_positions(mask, first, last):
    """pyreft's rule per row: of n real tokens, the first min(f, n//2) and last min(l, n//2)."""
    mask = np.asarray(mask)
    out = np.zeros(mask.shape, bool)
    for row in np.ndindex(mask.shape[:-1]):
        idx = np.flatnonzero(mask[row])
        n = len(idx)
        f, l = min(first, n // 2), min(last, n // 2)
        out[row][idx[:f]] = True
        out[row][idx[n - l:]] = True
    return out, mask


def ref_orthonormal(p):
    q, r = np.linalg.qr(f64(p))
    s = np.sign(np.diag(r))
    return q * np.where(s == 0, 1, s)


def apply_at(h, new, sel):
    return np.where(sel[..., None], new, h)


# ---------------------------------------------------------------- positions


def test_parse_positions():
    assert reft.parse_positions(None) is None
    assert reft.parse_positions("f7+l7") == (7, 7)
    assert reft.parse_positions("f5") == (5, 0)
    assert reft.parse_positions("l3") == (0, 3)
    assert reft.parse_positions([2, 1]) == (2, 1)
    assert jlora.LoReFT(2, positions="f7+l7").positions == (7, 7)
    assert jlora.LoReFT(2, positions="all").positions is None
    for bad in ["7", "f7+", "x7", "f0+l0", (1,), (-1, 2), (True, 1), 3]:
        with pytest.raises(ValueError, match="positions"):
            jlora.LoReFT(2, positions=bad)


@pytest.mark.parametrize("first,last", [(2, 2), (7, 7), (3, 0), (0, 2), (1, 5)])
def test_position_mask_matches_pyreft_rule(first, last):
    rows = [[1] * 9,                      # no padding
            [1] * 6 + [0] * 3,            # right-padded
            [0] * 4 + [1] * 5,            # left-padded, n odd
            [0] * 6 + [1] * 3,            # shorter than f + l
            [0] * 8 + [1],                # one token: n // 2 = 0
            [0] * 9,                      # empty
            [1, 0, 1, 1, 0, 1, 1, 1, 0]]  # holes
    mask = np.array(rows)
    want, _ = ref_positions(mask, first, last)
    got = np.asarray(reft.position_mask(jnp.asarray(mask), first, last))
    np.testing.assert_array_equal(got, want)
    assert not got[mask == 0].any()
    prefix, suffix = map(np.asarray, reft.position_masks(jnp.asarray(mask), first, last))
    assert not (prefix & suffix).any()
    np.testing.assert_array_equal(prefix | suffix, want)
    # left-padding the same tokens selects the same tokens
    right = np.array([[1] * 5 + [0] * 4]); left = right[:, ::-1]
    g_r = np.asarray(reft.position_mask(jnp.asarray(right), first, last))[0, :5]
    g_l = np.asarray(reft.position_mask(jnp.asarray(left), first, last))[0, 4:]
    np.testing.assert_array_equal(g_r, g_l)


# ---------------------------------------------------------------- forwards


def build(config, params=None, seed=0):
    return config.build_module(jax.random.key(seed), block_params() if params is None else params,
                               path="blocks_0")


def test_loreft_forward_matches_formula_with_orthonormal_r():
    node = build(jlora.LoReFT(R, positions="f2+l2", activation="linear"))
    h, mask = hidden(), np.array([[1] * 7, [1] * 5 + [0] * 2, [0] * 3 + [1] * 4])
    p = ref_orthonormal(node.p)
    np.testing.assert_allclose(p.T @ p, np.eye(R), atol=1e-6)  # R = Pᵀ: orthonormal rows
    np.testing.assert_allclose(f64(node.projection()), p, atol=1e-6)
    np.testing.assert_allclose(f64(node.R), p.T, atol=1e-6)  # the paper's R (r, d) and W (r, d)
    np.testing.assert_array_equal(f64(node.W), f64(node.w).T)
    hh, w, b = f64(h), f64(node.w), f64(node.b)
    sel, _ = ref_positions(mask, 2, 2)
    # column form per token: h + Rᵀ(W h + b − R h)
    new = hh + np.einsum("rd,...r->...d", p.T, np.einsum("dr,...d->...r", w, hh) + b
                         - np.einsum("rd,...d->...r", p.T, hh))
    got = node.edit(h, attention_mask=jnp.asarray(mask))
    np.testing.assert_allclose(f64(got), apply_at(hh, new, sel), rtol=1e-5, atol=1e-5)
    # positions=None edits every token, mask or not
    allpos = build(jlora.LoReFT(R))
    out = allpos.edit(h, attention_mask=jnp.asarray(mask))
    pa = ref_orthonormal(allpos.p)
    np.testing.assert_allclose(f64(out), hh + (hh @ f64(allpos.w) + f64(allpos.b) - hh @ pa) @ pa.T,
                               rtol=1e-5, atol=1e-5)


def test_loreft_activation_separate_weights_and_dropout():
    cfg = jlora.LoReFT(R, positions=(2, 3), activation="relu", share_weights=False, dropout=0.5)
    node = build(cfg)
    assert node.p.shape == (2, D, R) and node.b.shape == (2, R)
    h, mask = hidden(), np.array([[1] * 7, [1] * 6 + [0], [0] * 2 + [1] * 5])
    hh = f64(h)
    pre, suf = map(np.asarray, reft.position_masks(jnp.asarray(mask), 2, 3))
    want = hh.copy()
    for g, sel in enumerate((pre, suf)):
        p = ref_orthonormal(node.p[g])
        new = hh + (np.maximum(hh @ f64(node.w[g]) + f64(node.b[g]), 0) - hh @ p) @ p.T
        want = apply_at(want, new, sel)
    # dropout wraps the whole edited output at the selected positions (pyreft), nowhere else
    out = f64(jax.jit(lambda n, h, m, k: n.edit(h, attention_mask=m, dropout_key=k))(
        node, h, jnp.asarray(mask), jax.random.key(3)))
    sel = pre | suf
    np.testing.assert_array_equal(out[~sel], hh[~sel])
    kept = out[sel] != 0
    np.testing.assert_allclose(out[sel][kept], 2 * want[sel][kept], rtol=1e-5, atol=1e-5)
    assert 0.3 < kept.mean() < 0.7


def test_noreft_and_consreft_forwards():
    h, mask = hidden(), np.array([[1] * 7, [1] * 4 + [0] * 3, [0] + [1] * 6])
    hh = f64(h)
    sel, _ = ref_positions(mask, 1, 2)
    no = build(jlora.NoReFT(R, positions="f1+l2", proj_bias=True))
    w2, b2 = f64(no.w2), f64(no.b2)
    new = hh + (hh @ f64(no.w) + f64(no.b) - (hh @ w2 + b2)) @ w2.T
    np.testing.assert_allclose(f64(no.edit(h, attention_mask=jnp.asarray(mask))),
                               apply_at(hh, new, sel), rtol=1e-5, atol=1e-5)
    assert not np.allclose(w2.T @ w2, np.eye(R), atol=1e-2)  # not orthogonal
    cons = build(jlora.ConsReFT(R, positions="f1+l2"))
    p = ref_orthonormal(cons.p)
    np.testing.assert_allclose(p.T @ p, np.eye(R), atol=1e-6)
    assert ((f64(cons.b) >= 0) & (f64(cons.b) <= 1)).all()  # pyreft: torch.rand
    new = hh + (f64(cons.b) - hh @ p) @ p.T
    np.testing.assert_allclose(f64(cons.edit(h, attention_mask=jnp.asarray(mask))),
                               apply_at(hh, new, sel), rtol=1e-5, atol=1e-5)


def test_meft_reduces_to_loreft():
    """MeFT (read the output, D = w − P, U = Pᵀ, c = b, linear) is LoReFT at the same positions."""
    h, mask = hidden(), np.array([[1] * 7, [1] * 5 + [0] * 2, [0] * 3 + [1] * 4])
    for cfg in (jlora.LoReFT(R, positions="f2+l1"), jlora.NoReFT(R, positions="f2+l1"),
                jlora.ConsReFT(R, positions="f2+l1")):
        node = build(cfg)
        dn, up, c = node.meft_factors()
        meft = build(jlora.MeFT(R, positions="f2+l1", read="output", bias=True))
        meft = meft.replace(down=dn, up=up, c=c)
        want = f64(node.edit(h, attention_mask=jnp.asarray(mask)))
        got = f64(meft.edit(h, h, attention_mask=jnp.asarray(mask)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and the factors are the float64 formula's: D = W − P etc.
    node = build(jlora.LoReFT(R))
    dn, up, c = map(f64, node.meft_factors())
    p = ref_orthonormal(node.p)
    np.testing.assert_allclose(dn, f64(node.w) - p, atol=1e-6)
    np.testing.assert_allclose(up, p.T, atol=1e-6)


def test_module_dims_and_bad_input():
    assert reft.module_dims(block_params(), "b", owner="LoReFT") == (D, D, False)
    no_norm = {k: v for k, v in block_params().items() if k != "ln"}
    assert reft.module_dims(no_norm, "b", owner="LoReFT") == (D, D, False)
    # the params' own order (up before down), not the sorted one
    up_down = {"up": no_norm["fc1"], "down": no_norm["fc2"]}
    assert reft.module_dims(up_down, "b", owner="LoReFT") == (D, D, False)
    with pytest.raises(ValueError, match=r"b: LoReFT cannot read.*\[8, 16\].*pass dim="):
        reft.module_dims({"down": no_norm["fc2"], "up": no_norm["fc1"]}, "b", owner="LoReFT")
    assert reft.module_dims({"kernel": jnp.ones((5, 4)), "bias": jnp.ones(4)}, "d",
                            owner="MeFT") == (5, 4, True)
    with pytest.raises(ValueError, match="blocks_0.*pass dim="):
        jlora.LoReFT(2).build_module(jax.random.key(0), {"a": {"kernel": jnp.ones((4, 6))}},
                                     path="blocks_0")
    node = jlora.LoReFT(2, dim=6).build_module(jax.random.key(0),
                                               {"a": {"kernel": jnp.ones((4, 6))}}, path="blocks_0")
    assert node.p.shape == (6, 2)
    with pytest.raises(ValueError, match="blocks_0.*rank 9 exceeds"):
        build(jlora.LoReFT(9))
    with pytest.raises(ValueError, match="module-level"):
        jlora.LoReFT(2).build_module(jax.random.key(0), jnp.ones((4, 4)), path="w")
    for bad in [dict(rank=0), dict(rank=2, activation="swish"), dict(rank=2, dropout=1.0),
                dict(rank=2, share_weights=1), dict(rank=2, dim=0), dict(rank=2, dtype="int8")]:
        with pytest.raises(ValueError, match="LoReFT"):
            jlora.LoReFT(**bad)
    with pytest.raises(ValueError, match="blocks_0: LoReFT: attention_mask of shape"):
        build(jlora.LoReFT(2, positions="f1")).edit(hidden(), attention_mask=jnp.ones((3, 5)))
    with pytest.raises(ValueError, match="MeFT: read"):
        jlora.MeFT(2, read="residual")


def test_meft_reduces_to_lora_forward_and_merge():
    """MeFT's defaults (every position, linear, c = 0, reading the input) on a Dense are LoRA:
    equal to a jlora.LoRA forward and to its merge, through the public names."""
    wrap, x = _Wrap(), hidden((2, 4, 6))
    params = wrap.init(jax.random.key(0), x)["params"]
    lora = jlora.apply(params, jlora.Spec({"dense/kernel": jlora.LoRA(2, alpha=6.0)}),
                       key=jax.random.key(1))
    a = jax.random.normal(jax.random.key(2), (6, 2))
    b = jax.random.normal(jax.random.key(3), (2, 5))
    lora["dense"]["kernel"] = lora["dense"]["kernel"].replace(a=a, b=b)
    meft = jlora.apply(params, jlora.Spec({"dense": jlora.MeFT(2, alpha=6.0)}),
                       key=jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(meft["dense@meft"].up), 0)  # LoRA's init
    np.testing.assert_array_equal(np.asarray(jlora.linen.apply(wrap, {"params": meft}, x)),
                                  np.asarray(wrap.apply({"params": params}, x)))
    meft["dense@meft"] = meft["dense@meft"].replace(down=a, up=b)
    ref_k = f64(params["dense"]["kernel"]) + 3.0 * f64(a) @ f64(b)
    want = f64(x) @ ref_k + f64(params["dense"]["bias"])
    for tree in (meft, lora):
        np.testing.assert_allclose(f64(jlora.linen.apply(wrap, {"params": tree}, x)), want,
                                   rtol=1e-5, atol=1e-5)
    merged = jlora.merge(meft)
    assert set(merged) == {"dense"}
    np.testing.assert_allclose(f64(merged["dense"]["kernel"]), ref_k, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(f64(merged["dense"]["kernel"]),
                               f64(jlora.merge(lora)["dense"]["kernel"]), rtol=1e-6, atol=1e-6)
    # reading the output with a bias c: h + s·(h·D + c)·U, merged into kernel and bias
    out = jlora.apply(params, jlora.Spec({"dense": jlora.MeFT(2, read="output", bias=True,
                                                              alpha=6.0)}), key=jax.random.key(4))
    out["dense@meft"] = out["dense@meft"].replace(down=b.T, up=b, c=jnp.arange(2.0))
    h = f64(wrap.apply({"params": params}, x))
    want = h + 3.0 * (h @ f64(b).T + np.arange(2.0)) @ f64(b)
    np.testing.assert_allclose(f64(jlora.linen.apply(wrap, {"params": out}, x)), want,
                               rtol=1e-5, atol=1e-5)
    m2 = jlora.merge(out)["dense"]
    np.testing.assert_allclose(f64(x) @ f64(m2["kernel"]) + f64(m2["bias"]), want, rtol=1e-5,
                               atol=1e-5)
    back = out["dense@meft"].unmerge_from(m2)
    np.testing.assert_allclose(f64(back["kernel"]), f64(params["dense"]["kernel"]), atol=1e-5)
    np.testing.assert_allclose(f64(back["bias"]), f64(params["dense"]["bias"]), atol=1e-5)
    # not mergeable: positions, a nonlinear f, a bias c without a module bias, a block
    for cfg, why in [(jlora.MeFT(2, positions="f1+l1"), "positions"),
                     (jlora.MeFT(2, activation="relu"), "activation"),
                     (jlora.MeFT(2, bias=True), "bias c")]:
        node = cfg.build_module(jax.random.key(0), params["dense"], path="dense")
        with pytest.raises(ValueError, match=f"dense: MeFT cannot be merged.*{why}"):
            node.merge_into({"kernel": params["dense"]["kernel"]} if why == "bias c"
                            else params["dense"])
    with pytest.raises(ValueError, match="blocks_0: MeFT cannot.*not a Dense"):
        build(jlora.MeFT(2)).merge_into(block_params())
    with pytest.raises(ValueError, match="blocks_0: LoReFT cannot be merged"):
        build(jlora.LoReFT(2)).merge_into(block_params())


class _Wrap(nn.Module):
    keyword: bool = False  # call the Dense as dense(inputs=x)

    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(5, name="dense")
        return dense(inputs=x) if self.keyword else dense(x)


def test_meft_reading_the_input_of_a_keyword_call_is_refused_by_path():
    """read='input' reads the first positional argument: a keyword-only call is refused;
    read='output' does not need it and equals the positional call."""
    x = hidden((2, 4, 6))
    params = _Wrap().init(jax.random.key(0), x)["params"]
    meft = jlora.apply(params, jlora.Spec({"dense": jlora.MeFT(2)}), key=jax.random.key(1))
    with pytest.raises(ValueError, match=r"dense: MeFT\(read='input'\) reads the module's first "
                                         r"positional argument.*\['inputs'\]"):
        jlora.linen.apply(_Wrap(keyword=True), {"params": meft}, x)
    out = jlora.apply(params, jlora.Spec({"dense": jlora.MeFT(2, read="output")}),
                      key=jax.random.key(1))
    up = jax.random.normal(jax.random.key(2), out["dense@meft"].up.shape)
    out["dense@meft"] = out["dense@meft"].replace(up=up)
    node = out["dense@meft"]
    h = f64(_Wrap().apply({"params": params}, x))
    want = h + node.config.scale * (h @ f64(node.down)) @ f64(up)
    for keyword in (False, True):
        np.testing.assert_allclose(f64(jlora.linen.apply(_Wrap(keyword=keyword), {"params": out},
                                                         x)), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- end to end


class Block(nn.Module):
    """A pre-norm residual block (a feature mixer, then an MLP), output = the residual stream."""

    @nn.compact
    def __call__(self, x):
        h = x + nn.Dense(D, name="mix")(nn.LayerNorm(name="ln1")(x))
        return h + nn.Dense(D, name="down")(nn.relu(nn.Dense(16, name="up")(
            nn.LayerNorm(name="ln2")(h))))


class Tiny(nn.Module):
    layers: int = 2

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = Block(name=f"blocks_{i}")(x)
        return nn.Dense(2, name="head")(x.mean(-2)) if self.layers > 1 else x


def test_loreft_end_to_end_through_the_public_names():
    """apply -> split/combine -> training steps (R stays orthonormal) -> linen.apply against
    the float64 formula on the block's output; merge refuses and names the path."""
    model, x = Tiny(), hidden((4, 6, D))
    mask = jnp.asarray([[1] * 6, [1] * 4 + [0] * 2, [0] * 3 + [1] * 3, [0] + [1] * 5])
    labels = jnp.asarray([0, 1, 1, 0])
    params = model.init(jax.random.key(0), x)["params"]
    spec = jlora.Spec({"blocks_*": jlora.LoReFT(R, positions="f1+l2"), "head/kernel": jlora.Full()})
    adapted = jlora.apply(params, spec, key=jax.random.key(1))
    node = adapted["blocks_0@loreft"]
    assert isinstance(node, jlora.methods.LoReFTNode) and node.path == "blocks_0"
    np.testing.assert_array_equal(np.asarray(adapted["blocks_0"]["mix"]["kernel"]),
                                  np.asarray(params["blocks_0"]["mix"]["kernel"]))
    trainable, frozen = jlora.split(adapted)
    assert jlora.count_trainable(trainable) == 2 * (2 * D * R + R) + D * 2

    def loss(tr, fr, x, mask):
        logits = jlora.linen.apply(model, {"params": jlora.combine(tr, fr)}, x,
                                   context={"attention_mask": mask})
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    opt = optax.adam(0.05)

    @jax.jit
    def step(tr, st, fr, x, mask):
        val, g = jax.value_and_grad(loss)(tr, fr, x, mask)
        up, st = opt.update(g, st, tr)
        return optax.apply_updates(tr, up), st, val

    st, losses = opt.init(trainable), []
    for _ in range(3):
        trainable, st, val = step(trainable, st, frozen, x, mask)
        losses.append(float(val))
    assert losses[-1] < losses[0]
    if jax.device_count() >= 8:  # sharded equals single device: one step on a 4×2 mesh
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
        base = jax.tree.map(lambda a: P(None, "model") if a.ndim == 2 else None, params)
        tr_sh, fr_sh = jlora.split(jlora.sharding.place(jlora.combine(trainable, frozen), mesh,
                                                        base))
        batch = NamedSharding(mesh, P("data"))
        want = step(trainable, st, frozen, x, mask)
        got = step(tr_sh, st, fr_sh, jax.device_put(x, batch), jax.device_put(mask, batch))
        assert got[0]["blocks_0@loreft"].p.sharding.mesh.shape["data"] == 4
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                             rtol=1e-4, atol=1e-6), got, want)
    adapted = jlora.combine(trainable, frozen)
    for i in range(2):
        p = f64(adapted[f"blocks_{i}@loreft"].projection())
        np.testing.assert_allclose(p.T @ p, np.eye(R), atol=1e-5)  # orthonormal after training
    # one block with its trained intervention, against the formula on the plain block's output
    b0 = adapted["blocks_0@loreft"]
    h = f64(Block().apply({"params": params["blocks_0"]}, x))
    p = ref_orthonormal(b0.p)
    sel, _ = ref_positions(np.asarray(mask), 1, 2)
    want = apply_at(h, h + (h @ f64(b0.w) + f64(b0.b) - h @ p) @ p.T, sel)
    one = {"params": {"blocks_0": params["blocks_0"], "blocks_0@loreft": b0}}
    got = jlora.linen.apply(Tiny(layers=1), one, x, context={"attention_mask": mask})
    np.testing.assert_allclose(f64(got), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="blocks_0.*LoReFT"):
        jlora.merge(adapted)


def test_loreft_on_the_nnx_path():
    from flax import nnx

    class NBlock(nnx.Module):
        def __init__(self, rngs):
            self.ln, self.mix = nnx.LayerNorm(D, rngs=rngs), nnx.Linear(D, D, rngs=rngs)

        def __call__(self, x):
            return x + self.mix(self.ln(x))

    class NModel(nnx.Module):
        def __init__(self, rngs):
            self.block = NBlock(rngs)

        def __call__(self, x):
            return self.block(x)

    graphdef, state = nnx.split(NModel(nnx.Rngs(0)))
    x, mask = hidden((2, 5, D)), np.array([[1] * 5, [0, 0, 1, 1, 1]])
    adapted = jlora.apply(state, jlora.Spec({"block": jlora.LoReFT(R, positions="f1+l1")}),
                          key=jax.random.key(1))
    node = adapted["block@loreft"]
    y = jlora.nnx.apply(graphdef, adapted, x, context={"attention_mask": jnp.asarray(mask)})
    h = f64(nnx.merge(graphdef, state)(x))
    p = ref_orthonormal(node.p)
    sel, _ = ref_positions(mask, 1, 1)
    want = apply_at(h, h + (h @ f64(node.w) + f64(node.b) - h @ p) @ p.T, sel)
    np.testing.assert_allclose(f64(y), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [jlora.LoReFT, jlora.ConsReFT])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_factors_build_and_run(cls, dtype):
    """LAPACK's QR has no half-precision kernel: the projection is orthonormalised in float32."""
    node = build(cls(R, dtype=dtype))
    assert node.p.dtype == dtype
    p = ref_orthonormal(node.p)
    np.testing.assert_allclose(f64(node.projection()), p, atol=1e-2)
    np.testing.assert_allclose(p.T @ p, np.eye(R), atol=1e-6)
    h = hidden().astype(dtype)
    grads = jax.grad(lambda n: jnp.sum(n.edit(h).astype(jnp.float32) ** 2))(node)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


class _NoBias(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, use_bias=False, name="dense")(x)


def test_meft_bias_on_a_bias_free_dense_is_not_mergeable():
    x = hidden((2, 4, 6))
    params = _NoBias().init(jax.random.key(0), x)["params"]
    adapted = jlora.apply(params, jlora.Spec({"dense": jlora.MeFT(2, bias=True)}),
                          key=jax.random.key(1))
    node = adapted["dense@meft"]
    assert not node.mergeable and "module bias" in node.unmergeable_reason
    plain, left = jlora.merge(adapted, residual=True)  # kept aside, not a failed merge
    assert list(left) == ["dense@meft"]
    np.testing.assert_array_equal(np.asarray(plain["dense"]["kernel"]),
                                  np.asarray(params["dense"]["kernel"]))
    with pytest.raises(ValueError, match="its bias c needs a module bias"):
        jlora.merge(adapted)
    with_bias = jlora.apply(_Wrap().init(jax.random.key(0), x)["params"],
                            jlora.Spec({"dense": jlora.MeFT(2, bias=True)}), key=jax.random.key(1))
    assert with_bias["dense@meft"].mergeable
