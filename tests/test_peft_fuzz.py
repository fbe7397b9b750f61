"""Seeded mutations of real PEFT adapter directories through ``jlora.peft.load``.

Each mutated directory must either load to exactly the unmutated adapter (same
paths, node types, configs and arrays) or raise a ``ValueError`` that names the
file at fault; any other outcome (another exception type, a different adapter)
fails the test.

The mutations are the ways files get damaged or hand-edited: truncation, flipped
bytes in the config and in the safetensors header, dropped / renamed /
duplicated keys (tensors and config), changed shapes and dtypes, wrong-typed
and corrupt JSON. Left out on purpose, because they give another *valid*
adapter that no loader can tell apart from an intended one: flips inside the
tensors' data bytes (other finite values), edits of ``lora_alpha``,
``alpha_pattern`` and ``lora_dropout`` numbers, and dropping ``alpha_pattern``
or ``use_rslora`` (their absence means PEFT's documented default).
"""

import json
import os
import re

import numpy as np
import pytest

import jlora
from tests.test_peft import FIXTURES, assert_same_adapter, base_params

N_MUTATIONS = 1200
CASES = ("lora", "dora", "patterns", "rslora")
FILES = ("adapter_config.json", "adapter_model.safetensors")
JSON_VALUES = ["x", "", 3, -1, 2.5, 0, True, False, None, [], ["fc1"], {}, {"a": 1}, [[1]], 1e400]


def split_st(raw: bytes):
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    entries = [(k, v["dtype"], v["shape"], raw[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]])
               for k, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])]
    return entries, meta, 8 + n


def join_st(entries, meta) -> bytes:
    """A safetensors file from (name, dtype, shape, bytes); duplicate names are kept."""
    parts, offset, data = [], 0, b""
    if meta is not None:
        parts.append('"__metadata__":' + json.dumps(meta))
    for name, dtype, shape, blob in entries:
        parts.append(json.dumps(name) + ":" + json.dumps(
            {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}))
        offset += len(blob)
        data += blob
    header = ("{" + ",".join(parts) + "}").encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data


def excluded_spans(text: str):
    """Character spans of numbers whose change is another valid adapter."""
    spans = [m.span(2) for m in re.finditer(r'"(lora_alpha|lora_dropout)": ([-0-9.eE+]+)', text)]
    m = re.search(r'"alpha_pattern": \{[^}]*\}', text)
    if m:
        spans.append(m.span())
    return spans


def json_type(v) -> str:
    """JSON's own types: a number is a number, int or float."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    return "number" if isinstance(v, (int, float)) else type(v).__name__


def mutate(rng, config: bytes, weights: bytes):
    """One random mutation; returns (kind, config bytes, weights bytes)."""
    kind = rng.choice(["truncate_config", "truncate_weights", "flip_config", "flip_header",
                       "drop_tensor", "rename_tensor", "duplicate_tensor", "reshape_tensor",
                       "retype_tensor", "wrong_type_json", "corrupt_json", "drop_json_key",
                       "rename_json_key", "duplicate_json_key"])
    entries, meta, data_start = split_st(weights)
    text = config.decode()
    cfg = json.loads(text)
    if kind == "truncate_config":
        return kind, config[:rng.integers(0, len(config))], weights
    if kind == "truncate_weights":
        return kind, config, weights[:rng.integers(0, len(weights))]
    if kind == "flip_config":
        spans = excluded_spans(text)
        while True:
            i = int(rng.integers(0, len(config)))
            if not any(a <= i < b for a, b in spans):
                break
        b = bytearray(config)
        b[i] ^= int(rng.integers(1, 256))
        return kind, bytes(b), weights
    if kind == "flip_header":
        b = bytearray(weights)
        i = int(rng.integers(0, data_start))
        b[i] ^= 1 << int(rng.integers(0, 8)) if rng.random() < 0.5 else int(rng.integers(1, 256))
        return kind, config, bytes(b)
    i = int(rng.integers(0, len(entries)))
    name, dtype, shape, blob = entries[i]
    if kind == "drop_tensor":
        return kind, config, join_st(entries[:i] + entries[i + 1:], meta)
    if kind == "rename_tensor":
        choices = [name.replace("lora_A", "lora_B"), name.replace("lora_B", "lora_A"),
                   name + ".x", name.replace("base_model.model.", ""), name.replace("fc1", "fc3"),
                   name.replace(".weight", ""), name.upper(), name.replace("emb", "fc1")]
        new = str(rng.choice([c for c in choices if c != name] or [name + "_"]))
        return kind, config, join_st(entries[:i] + [(new, dtype, shape, blob)] + entries[i + 1:], meta)
    if kind == "duplicate_tensor":
        return kind, config, join_st(entries + [entries[i]], meta)
    if kind == "reshape_tensor":
        n = int(np.prod(shape))
        options = [[n], [1, n], shape[::-1], shape + [1], [1] + shape]
        new_shape = [int(d) for d in options[int(rng.integers(0, len(options)))]]
        if new_shape == shape:
            new_shape = shape + [1]
        return kind, config, join_st(entries[:i] + [(name, dtype, new_shape, blob)] + entries[i + 1:], meta)
    if kind == "retype_tensor":
        values = np.frombuffer(blob, np.float32).reshape(shape)
        new = [("I32", values.astype(np.int32).tobytes()), ("BOOL", (values > 0).tobytes()),
               ("F64", values.astype(np.float64).tobytes()), ("F16", blob), ("I32", blob),
               ("U8", blob), ("F64", blob), ("I64", values.astype(np.int64).tobytes())]
        dt, b = new[int(rng.integers(0, len(new)))]
        return kind, config, join_st(entries[:i] + [(name, dt, shape, b)] + entries[i + 1:], meta)
    keys = sorted(cfg)
    key = str(rng.choice(keys))
    if kind == "wrong_type_json":
        others = [v for v in JSON_VALUES if json_type(v) != json_type(cfg[key])]
        cfg[key] = others[int(rng.integers(0, len(others)))]
        return kind, json.dumps(cfg).encode(), weights
    if kind == "corrupt_json":
        options = [b"[]", b'"LORA"', b"5", b"null", b"\xff\xfe" + config, config + b"}",
                   config.replace(b":", b"=", 1), b"{" + config, config[:-3] + b",}",
                   config.replace(b'"r": 4', b'"r": NaN'), "{\"r\": \"\u00e9\"}".encode("latin-1")]
        return kind, options[int(rng.integers(0, len(options)))], weights
    if kind == "drop_json_key":
        safe = [k for k in keys if k not in ("alpha_pattern", "use_rslora")]
        del cfg[str(rng.choice(safe))]
        return kind, json.dumps(cfg).encode(), weights
    if kind == "rename_json_key":
        new = key[:-1] + chr(ord(key[-1]) ^ 1)
        cfg[new] = cfg.pop(key)
        return kind, json.dumps(cfg).encode(), weights
    # duplicate_json_key
    pair = json.dumps({key: cfg[key]})[1:-1]
    return kind, ("{" + pair + "," + json.dumps(cfg)[1:]).encode(), weights


def test_fuzzed_adapters_load_exactly_or_fail_naming_the_file(tmp_path):
    rng = np.random.default_rng(20240601)
    originals = {}
    for case in CASES:
        d = os.path.join(FIXTURES, case, "adapter")
        files = {f: open(os.path.join(d, f), "rb").read() for f in FILES}
        originals[case] = (files, base_params(case), jlora.peft.load(d, base_params(case)))
    outcomes = {}
    target = tmp_path / "adapter"
    target.mkdir()
    for i in range(N_MUTATIONS):
        case = CASES[i % len(CASES)]
        files, params, want = originals[case]
        kind, config, weights = mutate(rng, files[FILES[0]], files[FILES[1]])
        (target / FILES[0]).write_bytes(config)
        (target / FILES[1]).write_bytes(weights)
        try:
            got = jlora.peft.load(target, params)
        except ValueError as e:
            assert any(f in str(e) for f in FILES), f"mutation {i} ({kind}): {e}"
            outcomes[kind, "error"] = outcomes.get((kind, "error"), 0) + 1
            continue
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"mutation {i} ({case}, {kind}) raised {type(e).__name__}: {e}")
        try:
            assert_same_adapter(got, want)
        except AssertionError as e:
            pytest.fail(f"mutation {i} ({case}, {kind}) loaded a different adapter: {e}")
        outcomes[kind, "same"] = outcomes.get((kind, "same"), 0) + 1
    # every kind of mutation was exercised, and most of them are errors
    assert len({k for k, _ in outcomes}) == 14
    assert sum(v for (k, o), v in outcomes.items() if o == "error") > N_MUTATIONS // 2
