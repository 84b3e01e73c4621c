"""Every config file: it loads, its lists are settable, it holds only the sections it uses."""

import glob
import importlib
import os

import ml_collections
import pytest

from ir_lora import methods
from ir_lora.stages import registry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FILES = sorted(
    os.path.splitext(os.path.basename(p))[0]
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if not os.path.basename(p).startswith(("_", "common"))
)
ARGS = {"uir_lora": ["run=pretrain", "run=lora_haze", "run=composition"]}


def _configs():
    for name in FILES:
        module = importlib.import_module(f"configs.{name}")
        for arg in ARGS.get(name, [None]):
            yield f"{name}:{arg}", module.get_config(arg)


def _walk(config, prefix="config"):
    """Every (dotted path, value) of a config, sub-configs of stages included."""
    for key, value in config.items():
        path = f"{prefix}.{key}"
        yield path, value
        if isinstance(value, ml_collections.ConfigDict):
            yield from _walk(value, path)


def _trained(config):
    """The configs in `config` that a training stage runs (itself, or its sub-configs)."""
    if "method" in config:
        return [config]
    return [v for v in config.values() if isinstance(v, ml_collections.ConfigDict) and "stage" in v]


@pytest.mark.parametrize(("name", "config"), list(_configs()), ids=lambda v: str(v)[:40])
def test_config(name, config):
    assert config.is_locked, name
    assert config.stage in registry.STAGES, name
    # ml-collections cannot override a list from the command line; tuples it can.
    lists = [path for path, value in _walk(config) if isinstance(value, list)]
    assert not lists, f"{name}: make these tuples: {lists}"
    for run in _trained(config):
        if "method" not in run:
            continue
        own = set(methods.spec(run).sections)
        foreign = {s for s in run if methods.section_owner(s) not in (None, run.method)}
        assert own <= set(run), f"{name}: {run.method} misses {own - set(run)}"
        assert not foreign - own, f"{name}: sections of other methods {foreign - own}"
