"""Configuration: structured dataclass defaults + a YAML preset + dotlist overrides (OmegaConf).

Every CLI goes through `load_config`, so unknown keys fail the same way everywhere: with the
list of valid keys, before any work starts.
"""
from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    OmegaConfBaseException,
    ValidationError,
)

from seer_pipeline.core.io_utils import atomic_write_text

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A preset or override that does not fit the schema."""


# Resolvers (`${name:...}`) the schema's values use: none. Every resolver is refused, in what we
# load (presets, overrides) and in what we read back (a run's config.yaml, a checkpoint's
# config): `${oc.env:AWS_SECRET_ACCESS_KEY}` was resolved and written into config.yaml,
# meta.json, checkpoints, logs and the sbatch script, and a planted one in a run folder was
# resolved in the reader's environment and printed in an error (issue #24). Plain references
# between keys (`${model.trunk}`) resolve inside the config and stay allowed.
ALLOWED_RESOLVERS: frozenset[str] = frozenset()
_RESOLVER_CALL = re.compile(r"\$\{\s*([A-Za-z_][\w.\-]*)\s*:")


def _leaves(obj: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}{k}.")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], obj


def check_resolvers(node: Any, where: str) -> None:
    """ConfigError if any value (unresolved) calls a resolver outside ALLOWED_RESOLVERS.

    The value itself is never echoed (it is what might leak)."""
    raw = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node
    for key, v in _leaves(raw):
        if isinstance(v, str) and "${" in v:
            for name in _RESOLVER_CALL.findall(v):
                if name not in ALLOWED_RESOLVERS:
                    raise ConfigError(
                        f"{where}: {key} calls the resolver '{name}' (${{{name}:...}}); config "
                        "values are literals, resolvers are refused so that nothing (credentials "
                        "included) is resolved into config.yaml, checkpoints or logs")


def non_finite_errors(cfg: Any) -> list[str]:
    """One message per float value that is NaN or infinite (`optim.base_lr=nan` was accepted)."""
    raw = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    return [f"{key} must be a finite number, got {v}" for key, v in _leaves(raw)
            if isinstance(v, float) and not math.isfinite(v)]


def parse_saved_config(text: str, where: str) -> dict:
    """A config a run folder holds (config.yaml, a checkpoint's `config_yaml`) as a plain dict,
    refused (ConfigError) if it is not a YAML mapping or calls a resolver."""
    try:
        node = OmegaConf.create(text)
    except Exception as e:  # noqa: BLE001 - yaml and omegaconf raise many kinds
        raise ConfigError(f"{where}: not a readable config ({type(e).__name__})") from None
    if not OmegaConf.is_dict(node):
        raise ConfigError(f"{where}: not a config mapping")
    check_resolvers(node, where)
    return OmegaConf.to_container(node, resolve=False)  # type: ignore[return-value]


def load_saved_config(path: str | Path) -> DictConfig:
    """`OmegaConf.load` of a run folder's config.yaml, through `parse_saved_config`'s checks."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: unreadable ({e})") from None
    return OmegaConf.create(parse_saved_config(text, str(p)))


def valid_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every leaf key of a config, dotted (`train.steps`, ...)."""
    keys: list[str] = []
    for k, v in cfg.items_ex(resolve=False) if hasattr(cfg, "items_ex") else cfg.items():
        full = f"{prefix}{k}"
        if isinstance(v, DictConfig):
            keys.extend(valid_keys(v, full + "."))
        else:
            keys.append(full)
    return keys


def suggest_keys(key: str, keys: Sequence[str], n: int = 3) -> list[str]:
    """The valid keys a typo most likely meant: close dotted names first, then the same or a
    close last part in another section (`steps` -> `train.steps`, `data.batchsize` ->
    `data.batch_size`)."""
    leaf = key.rsplit(".", 1)[-1]
    leaves = {k: k.rsplit(".", 1)[-1] for k in keys}
    out = difflib.get_close_matches(key, keys, n=n, cutoff=0.75)
    out += [k for k, lf in leaves.items() if lf == leaf]
    out += [k for k, lf in leaves.items() if difflib.SequenceMatcher(None, leaf, lf).ratio() >= 0.8]
    return list(dict.fromkeys(out))[:n]


def _unknown_key_error(base: DictConfig, key: str, where: str) -> ConfigError:
    keys = valid_keys(base)
    close = suggest_keys(key, keys)
    if close:
        hint = "did you mean " + " or ".join(f"`{k}`" for k in close) + "?"
    else:  # nothing close: the section's keys if the section exists, else the sections
        section = key.split(".", 1)[0] + "."
        same = [k for k in keys if k.startswith(section)]
        hint = (f"keys of `{section[:-1]}`: {', '.join(same)}" if same and "." in key
                else "sections: " + ", ".join(dict.fromkeys(k.split(".", 1)[0] for k in keys)))
    return ConfigError(f"unknown config key '{key}' in {where}: {hint} (every key: docs/config.md)")


def _check_keys(base: DictConfig, other: DictConfig, where: str, prefix: str = "") -> None:
    for k, v in other.items_ex(resolve=False):  # checking keys must not resolve values
        full = f"{prefix}{k}"
        if k not in base:
            # Open dict fields (Dict[str, Any] in the schema) accept any key.
            # (In a structured config their struct flag is unset, not False: check the type.)
            if OmegaConf.is_dict(base) and (base._get_node_flag("struct") is False
                                            or OmegaConf.get_type(base) is dict):
                continue
            raise _unknown_key_error(base if not prefix else _root(base), full, where)
        if isinstance(v, DictConfig) and isinstance(base[k], DictConfig):
            _check_keys(base[k], v, where, full + ".")


def _root(cfg: DictConfig) -> DictConfig:
    node = cfg
    while node._get_parent() is not None:
        node = node._get_parent()
    return node


def resolve_preset(preset: str | Path, preset_dir: Path = PRESET_DIR) -> Path:
    p = Path(preset)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    cand = preset_dir / f"{preset}.yaml"
    if cand.exists():
        return cand
    names = sorted(x.stem for x in preset_dir.glob("*.yaml"))
    raise ConfigError(f"unknown preset '{preset}'; available: {', '.join(names)} (or a .yaml path)")


def load_config(
    schema: Any,
    preset: str | Path | None = None,
    overrides: Sequence[str] = (),
    preset_dir: Path = PRESET_DIR,
) -> DictConfig:
    """defaults (dataclass) <- preset YAML (may `defaults:`-chain via `_base_`) <- dotlist."""
    base = OmegaConf.structured(schema)
    layers: list[tuple[DictConfig, str]] = []
    if preset is not None:
        path = resolve_preset(preset, preset_dir)
        chain: list[Path] = []
        while path is not None:
            chain.append(path)
            raw = OmegaConf.load(path)
            parent = raw.pop("_base_", None) if isinstance(raw, DictConfig) else None
            path = resolve_preset(parent, preset_dir) if parent else None
        for p in reversed(chain):
            raw = OmegaConf.load(p)
            raw.pop("_base_", None)
            layers.append((raw, f"preset {p.name}"))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must be key=value, got: {bad}")
    if overrides:
        layers.append((OmegaConf.from_dotlist(list(overrides)), "command-line overrides"))
    cfg = base
    for layer, where in layers:
        check_resolvers(layer, where)
        _check_keys(base, layer, where)
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except (ConfigKeyError, ConfigAttributeError) as e:
            raise _unknown_key_error(base, str(e.key) if hasattr(e, "key") else str(e), where) from e
        except ValidationError as e:  # one line: omegaconf appends full_key/reference_type lines
            key = getattr(e, "full_key", None)
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"bad value{f' for {key}' if key else ''} in {where}: {first}") from e
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:  # e.g. `${no.such.key}`: one line, not a traceback
        raise ConfigError(f"bad interpolation: {str(e).splitlines()[0]}") from None
    return cfg


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def save_config(cfg: DictConfig, path: str | Path) -> None:
    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))


def diff_configs(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config dicts."""
    out: list[str] = []
    for k in sorted(set(a) | set(b)):
        full = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(diff_configs(va, vb, full + "."))
        elif va != vb:
            out.append(full)
    return out


def iter_leaves(cfg: dict, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in cfg.items():
        if isinstance(v, dict):
            yield from iter_leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v
