"""``Spec``: ordered rules mapping leaf paths to method configs.

Patterns are globs over the whole ``/``-joined path:

* ``*`` matches within one segment, ``?`` one character of a segment,
* ``**`` any number of whole segments (including none: ``**/kernel`` matches a
  root-level ``kernel``),
* ``{a,b}`` alternates (alternatives may hold globs themselves),

or compiled regular expressions (``re.compile(...)``), matched against the full
path. The first rule that matches a leaf wins; leaves no rule matches stay
frozen and untouched. A rule whose method is module-level (``jlora.AdaptFormer``)
matches module paths (``enc/layers_1/mlp``, the subtree above leaves) instead.

Example::

    >>> import jlora
    >>> spec = jlora.Spec({"**/attn/{query,value}/kernel": jlora.LoRA(rank=8)})
    >>> spec.match("encoder/layers_0/attn/query/kernel").rank
    8
    >>> spec.match("encoder/layers_0/attn/key/kernel") is None
    True
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping

import jax.numpy as jnp
import numpy as np

from jlora.methods.base import CONFIGS, Config


def glob_to_regex(pattern: str) -> str:
    """Translate a jlora glob into an (unanchored) regular expression."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("/**", i) and i + 3 == n:
            out.append("(?:/.*)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "{":
            depth, j = 1, i + 1
            while j < n and depth:
                depth += {"{": 1, "}": -1}.get(pattern[j], 0)
                j += 1
            if depth:
                raise ValueError(f"Spec pattern {pattern!r}: unbalanced '{{'")
            alts = _split_top_level(pattern[i + 1 : j - 1])
            out.append("(?:" + "|".join(glob_to_regex(a) for a in alts) + ")")
            i = j
        elif c == "}":
            raise ValueError(f"Spec pattern {pattern!r}: unbalanced '}}'")
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


def _split_top_level(body: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for j, c in enumerate(body):
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(body[start:j])
            start = j + 1
    parts.append(body[start:])
    return parts


class Rule:
    """One ``pattern -> config`` rule."""

    def __init__(self, pattern: str | re.Pattern, config: Config):
        if isinstance(pattern, re.Pattern):
            self.regex = pattern
        elif isinstance(pattern, str):
            if not pattern and getattr(config, "level", "leaf") != "module":
                raise ValueError("Spec: empty pattern (only a module-level method may name "
                                 "the root module with \"\")")
            self.regex = re.compile(glob_to_regex(pattern))
        else:
            raise ValueError(
                f"Spec: pattern {pattern!r} must be a glob string or re.compile(...)"
            )
        if not isinstance(config, Config):
            raise ValueError(
                f"Spec: pattern {self.describe(pattern)} maps to {config!r}, "
                "which is not a jlora method config (e.g. jlora.LoRA(rank=8))"
            )
        self.pattern = pattern
        self.config = config

    @staticmethod
    def describe(pattern) -> str:
        if not isinstance(pattern, re.Pattern):
            return repr(pattern)
        flags = _flags(pattern)
        return repr(pattern.pattern) + (f" (flags {re.RegexFlag(flags)!r})" if flags else "")

    @property
    def level(self) -> str:
        """``"leaf"``, or ``"module"`` for a module-level method (the rule names modules)."""
        return getattr(self.config, "level", "leaf")

    def matches(self, path: str) -> bool:
        return self.regex.fullmatch(path) is not None

    def __repr__(self) -> str:
        return f"{self.describe(self.pattern)}: {self.config!r}"


class Spec:
    """Ordered ``pattern -> config`` rules; the first match wins.

    Args:
      rules: a mapping (insertion order is rule order) or a sequence of
        ``(pattern, config)`` pairs.
    """

    def __init__(self, rules: Mapping[Any, Config] | Iterable[tuple[Any, Config]]):
        items = rules.items() if isinstance(rules, Mapping) else rules
        try:
            pairs = [tuple(pair) for pair in items]
        except TypeError:
            pairs = None
        if isinstance(rules, (str, bytes, Config)) or pairs is None or any(
                len(pair) != 2 for pair in pairs):
            raise ValueError(f"Spec: rules must be a mapping {{pattern: config}} or a sequence "
                             f"of (pattern, config) pairs, got {rules!r}")
        self.rules = tuple(Rule(p, c) for p, c in pairs)
        if not self.rules:
            raise ValueError("Spec: no rules given")

    def match_rule(self, path: str, *, level: str = "leaf") -> Rule | None:
        """The first rule of ``level`` matching ``path``, or ``None``.

        ``level="leaf"`` considers leaf methods' rules (``path`` is a leaf's),
        ``"module"`` module-level methods' rules (``path`` is a module's).
        """
        for rule in self.rules:
            if rule.level == level and rule.matches(path):
                return rule
        return None

    def hits(self, path: str, *, level: str = "leaf") -> list[int]:
        """Indices of every rule of ``level`` matching ``path`` (the first one wins)."""
        return [i for i, rule in enumerate(self.rules)
                if rule.level == level and rule.matches(path)]

    def match(self, path: str, *, level: str = "leaf") -> Config | None:
        """The config of the first rule of ``level`` matching ``path``, or ``None``."""
        rule = self.match_rule(path, level=level)
        return None if rule is None else rule.config

    def __repr__(self) -> str:
        return "Spec({" + ", ".join(map(repr, self.rules)) + "})"

    # Specs travel with checkpoints; two specs are equal when their rules are.
    def __eq__(self, other) -> bool:
        return isinstance(other, Spec) and [
            (r.describe(r.pattern), type(r.pattern), r.config) for r in self.rules
        ] == [(r.describe(r.pattern), type(r.pattern), r.config) for r in other.rules]

    def __hash__(self) -> int:
        return hash(tuple((Rule.describe(r.pattern), r.config) for r in self.rules))


def config_to_dict(config: Config) -> dict:
    """A JSON-ready description of a config: ``{"method": name, option: value, ...}``."""
    name = type(config).__name__
    if CONFIGS.get(name) is not type(config):
        raise ValueError(f"config {config!r} is not a registered jlora method")
    out = {"method": name}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if f.name == "dtype" and v is not None:
            v = jnp.dtype(v).name
        elif isinstance(v, tuple):
            v = [x.item() if isinstance(x, np.generic) else x for x in v]
        elif isinstance(v, np.generic):  # LoRA(rank=np.int64(2)) is a valid option
            v = v.item()
        out[f.name] = v
    return out


def config_from_dict(d: dict) -> Config:
    """Inverse of :func:`config_to_dict` (the method is looked up in the registry)."""
    if not isinstance(d, dict):
        raise ValueError(f"a method config must be a JSON object, got {d!r}")
    d = dict(d)
    name = d.pop("method", None)
    if not isinstance(name, str) or name not in CONFIGS:
        raise ValueError(f"unknown jlora method {name!r}; known: {sorted(CONFIGS)}")
    if isinstance(d.get("in_axes"), list):
        d["in_axes"] = tuple(d["in_axes"])
    return CONFIGS[name](**d)


def spec_to_json(spec: Spec) -> list:
    """Rules as JSON: ``[{"glob" | "regex": pattern, "config": {...}}]``."""
    out = []
    for r in spec.rules:
        if isinstance(r.pattern, re.Pattern):
            rule = {"regex": r.pattern.pattern}
            if _flags(r.pattern):
                rule["flags"] = _flags(r.pattern)
        else:
            rule = {"glob": r.pattern}
        out.append({**rule, "config": config_to_dict(r.config)})
    return out


def _flags(pattern: re.Pattern) -> int:
    """A compiled pattern's own flags (``re.IGNORECASE``, ...), without the implicit ones."""
    return int(pattern.flags & ~re.UNICODE)


def spec_from_json(rules: list) -> Spec:
    """Inverse of :func:`spec_to_json`."""
    if not isinstance(rules, list):
        raise ValueError(f"a spec's JSON must be a list of rules, got {type(rules).__name__}")
    out = []
    for i, r in enumerate(rules):
        if not isinstance(r, dict) or "config" not in r or ("regex" in r) == ("glob" in r):
            raise ValueError(f"spec rule #{i} must be an object with 'glob' or 'regex' and "
                             f"'config', got {r!r}")
        flags = r.get("flags", 0)
        if type(flags) is not int or flags < 0:
            raise ValueError(f"spec rule #{i}: 'flags' must be a non-negative int, got {flags!r}")
        try:
            pattern = re.compile(r["regex"], flags) if "regex" in r else r["glob"]
        except (re.error, TypeError, ValueError) as e:
            raise ValueError(f"spec rule #{i}: not a regular expression ({e})") from None
        out.append((pattern, config_from_dict(r["config"])))
    return Spec(out)
