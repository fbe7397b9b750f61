"""jlora.optim's namespace: one public path per name, private modules reachable, the old
``jlora.glora`` names kept as warning aliases."""

import importlib
import types

import pytest

import jlora
import jlora.optim

PRIVATE = ("_adalora", "_bar", "_fedopt", "_flat_lora", "_flora", "_glora", "_lora_plus",
           "_mezo", "_sparse")


def test_private_modules_import_and_nothing_is_shadowed():
    for name in PRIVATE:
        mod = importlib.import_module(f"jlora.optim.{name}")
        assert isinstance(mod, types.ModuleType)
    for name in jlora.optim.__all__:
        obj = getattr(jlora.optim, name)
        assert not isinstance(obj, types.ModuleType), name
        # defined in exactly one private module, and that module's object is the public one
        homes = [m for m in PRIVATE
                 if getattr(importlib.import_module(f"jlora.optim.{m}"), name, None) is obj]
        src = getattr(obj, "__module__", None)
        assert src in {f"jlora.optim.{m}" for m in PRIVATE}, (name, src)
        assert len(homes) <= 1, (name, homes)
    assert sorted(n for n in dir(jlora.optim) if not n.startswith("_")
                  and not isinstance(getattr(jlora.optim, n), types.ModuleType)) == sorted(
        jlora.optim.__all__)


def test_glora_alias_module_warns_and_returns_the_optim_objects():
    pairs = {"sample": "glora_sample", "fix": "glora_fix", "search": "glora_search",
             "param_count": "glora_param_count", "current": "glora_current",
             "layers": "glora_layers", "describe": "glora_describe",
             "SearchResult": "GLoRASearchResult"}
    for old, new in pairs.items():
        with pytest.warns(DeprecationWarning, match=f"jlora.optim.{new}"):
            assert getattr(jlora.glora, old) is getattr(jlora.optim, new)
    with pytest.raises(AttributeError):
        jlora.glora.nonexistent
