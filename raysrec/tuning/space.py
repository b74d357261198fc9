"""Search spaces as YAML: any ``TrainConfig`` field (dotted for the model) with a distribution.

```yaml
model.num_layers: {choice: [1, 2, 3]}
model.dropout: {uniform: [0.0, 0.5]}
lr: {loguniform: [1.0e-4, 1.0e-2]}
model.hidden_dim: {choice: [32, 64, 128]}
batch_size: 128            # a plain value is fixed for every trial
```

Kinds: ``choice`` (list), ``uniform`` / ``loguniform`` ([low, high]), ``randint`` ([low, high),
integers), ``quniform`` ([low, high, q]). Field names are checked against ``TrainConfig`` and
every fixed value is type-checked, so a typo fails before any trial starts. Pure: no Ray needed
to parse; :func:`to_tune` turns a space into ``ray.tune`` distributions.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from pathlib import Path
from typing import Any

from raysrec.config import read_yaml
from raysrec.errors import ConfigError
from raysrec.train.config import TrainConfig

KINDS = {"choice", "uniform", "loguniform", "randint", "quniform"}


@dataclasses.dataclass(frozen=True)
class Param:
    path: str          # e.g. "model.dropout" or "lr"
    kind: str          # one of KINDS, or "fixed"
    args: Any


def _check_path(path: str, where: str) -> None:
    node: Any = TrainConfig()
    for part in path.split("."):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            raise ConfigError(f"{where}: '{path}' is not a TrainConfig field (e.g. 'lr', 'model.dropout')")
        node = getattr(node, part)
    if path in ("data", "output", "resume_from", "storage_path"):
        raise ConfigError(f"{where}: '{path}' cannot be searched")


def parse_space(raw: dict[str, Any], where: str = "search space") -> list[Param]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: expected a non-empty mapping of field -> distribution")
    params = []
    for path, spec in raw.items():
        _check_path(path, where)
        if isinstance(spec, dict):
            if len(spec) != 1 or next(iter(spec)) not in KINDS:
                raise ConfigError(f"{where}: '{path}' needs exactly one of {sorted(KINDS)}, got {list(spec)}")
            kind, args = next(iter(spec.items()))
            if kind == "choice":
                if not isinstance(args, list) or not args:
                    raise ConfigError(f"{where}: '{path}': choice needs a non-empty list")
            else:
                n = 3 if kind == "quniform" else 2
                if not isinstance(args, list) or len(args) != n or not all(isinstance(a, (int, float)) for a in args):
                    raise ConfigError(f"{where}: '{path}': {kind} needs {n} numbers, got {args!r}")
                if not args[0] < args[1]:
                    raise ConfigError(f"{where}: '{path}': {kind} needs low < high, got {args!r}")
                if kind == "loguniform" and args[0] <= 0:
                    raise ConfigError(f"{where}: '{path}': loguniform needs low > 0")
            params.append(Param(path, kind, args))
        else:
            params.append(Param(path, "fixed", spec))
    # Every value a trial can get must make a valid TrainConfig field (types, literals).
    for p in params:
        values = p.args if p.kind == "choice" else [p.args] if p.kind == "fixed" else [p.args[0]]
        for value in values:
            apply_overrides(TrainConfig(), {p.path: value}, where=where)
    return params


def load_space(path: str | Path) -> list[Param]:
    return parse_space(read_yaml(path, "search space file"), where=str(path))


def apply_overrides(base: TrainConfig, overrides: dict[str, Any], where: str = "trial") -> TrainConfig:
    """``base`` with dotted-path values set, type- and range-checked."""
    data = base.to_dict()
    for path, value in overrides.items():
        node = data
        *parents, leaf = path.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value.item() if hasattr(value, "item") else value
    try:
        return TrainConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def to_tune(params: list[Param]) -> dict[str, Any]:
    """``param_space`` for ``ray.tune.Tuner`` (flat keys = dotted paths)."""
    from ray import tune  # noqa: PLC0415

    out: dict[str, Any] = {}
    for p in params:
        if p.kind == "fixed":
            out[p.path] = p.args
        elif p.kind == "choice":
            out[p.path] = tune.choice(p.args)
        elif p.kind == "uniform":
            out[p.path] = tune.uniform(*p.args)
        elif p.kind == "loguniform":
            out[p.path] = tune.loguniform(*p.args)
        elif p.kind == "randint":
            out[p.path] = tune.randint(*p.args)
        else:
            out[p.path] = tune.quniform(*p.args)
    return out


def space_path(name: str) -> Path:
    """A search space: a YAML path, or a name looked up as ``tune/<name>.yaml`` in the working directory and
    then among the spaces packaged with raysrec (``raysrec/tuning/spaces/``; ``default`` is one)."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        candidates = [Path(name)]
    else:
        packaged = importlib.resources.files("raysrec.tuning.spaces") / f"{name}.yaml"
        candidates = [Path("tune") / f"{name}.yaml", Path(str(packaged))]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"search space '{name}' not found (tried {', '.join(str(c) for c in candidates)})")
