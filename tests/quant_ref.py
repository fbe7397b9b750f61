"""float64 numpy reference of bitsandbytes' blockwise NF4/FP4 quantization with
double quantization, written from the algorithm (QLoRA §3; bitsandbytes
``quantize_4bit``): nearest code, ties to the lower index, blocks of the
PyTorch ``(out, in)`` weight flattened row-major."""

import numpy as np

from jlora import quant as Q


def nearest(v, code):
    """float64 nearest code index, ties to the lower index (over the sorted code)."""
    code = np.asarray(code, np.float64)
    order = np.argsort(code, kind="stable")
    d = np.abs(v[:, None] - code[order][None, :])
    return order[np.argmin(d, axis=1)]  # argmin takes the first (lower) on ties


def ref_blockwise(flat, code, bs):
    """float64 reference: per-block absmax, nearest code of clip(x/absmax)."""
    flat = np.asarray(flat, np.float64)
    n = flat.size
    nb = -(-n // bs)
    pad = np.zeros(nb * bs)
    pad[:n] = flat
    absmax = np.abs(pad.reshape(nb, bs)).max(1)
    scaled = np.clip(pad.reshape(nb, bs) / np.maximum(absmax, 1e-38)[:, None], -1, 1)
    return nearest(scaled.reshape(-1), code)[:n], absmax, scaled.reshape(-1)[:n]


def ref_quantize(k, quant, bs, dq):
    """float64 reference of bnb's quantize_4bit(Kᵀ) (+ compress_statistics) and
    its dequantization."""
    code = {"nf4": Q.NF4, "fp4": Q.FP4}[quant]
    flat = np.asarray(k, np.float64).T.reshape(-1)
    q, absmax, scaled = ref_blockwise(flat, code, bs)
    out = {"q": q, "absmax": absmax, "scaled": scaled}
    if dq:
        offset = absmax.mean()
        q2, absmax2, scaled2 = ref_blockwise(absmax - offset, Q.dynamic_map(), 256)
        out.update(q2=q2, absmax2=absmax2, offset=offset, scaled2=scaled2)
        absmax = (np.asarray(Q.dynamic_map(), np.float64)[q2]
                  * np.repeat(absmax2, 256)[: absmax.size] + offset)
    deq = np.asarray(code, np.float64)[q] * np.repeat(absmax, bs)[: flat.size]
    out["deq"] = deq.reshape(np.asarray(k).T.shape).T
    return out


def near_midpoint(scaled, code, tol=1e-6):
    c = np.sort(np.asarray(code, np.float64))
    mids = (c[:-1] + c[1:]) / 2
    return np.min(np.abs(scaled[:, None] - mids[None, :]), axis=1) < tol
