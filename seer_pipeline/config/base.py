"""Configuration: structured dataclass defaults + a YAML preset + dotlist overrides (OmegaConf).

Every CLI goes through `load_config`, so unknown keys fail the same way everywhere: with the
list of valid keys, before any work starts.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterable, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from seer_pipeline.core.io_utils import atomic_write_text

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A preset or override that does not fit the schema."""


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
    for k, v in other.items():
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
        _check_keys(base, layer, where)
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except (ConfigKeyError, ConfigAttributeError) as e:
            raise _unknown_key_error(base, str(e.key) if hasattr(e, "key") else str(e), where) from e
        except ValidationError as e:  # one line: omegaconf appends full_key/reference_type lines
            key = getattr(e, "full_key", None)
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"bad value{f' for {key}' if key else ''} in {where}: {first}") from e
    OmegaConf.resolve(cfg)
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
