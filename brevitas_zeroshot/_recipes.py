"""Recipes: saved PipelineConfigs as flat YAML (the `bzq quantize` options), plus what we measured with them.

Looked up in ``$BZQ_RECIPES``, the ``recipes/`` folder of a source checkout, and the copy installed with the
package (``<prefix>/share/brevitas_zeroshot/recipes``). Everything is validated before any work starts.
"""

import dataclasses
import os
import sys
import types
import typing
from pathlib import Path

import yaml

from ._errors import BzqError

__all__ = [
    "RECIPE_INFO_KEYS",
    "find_recipe",
    "list_recipes",
    "load_recipe",
    "parse_quant_settings",
    "recipe_dirs",
    "recipe_hint",
]

# Keys that describe a recipe rather than configure the run.
RECIPE_INFO_KEYS: dict[str, type] = {
    "description": str,
    "expected_float_top1": float,
    "expected_top1": float,
    "expected_on": str,
}


def recipe_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get("BZQ_RECIPES", "").split(os.pathsep) if p]
    dirs += [
        Path(__file__).resolve().parents[1] / "recipes",
        Path(sys.prefix) / "share" / "brevitas_zeroshot" / "recipes",
    ]
    return [d for d in dirs if d.is_dir()]


def list_recipes() -> list[Path]:
    """Every recipe file, the first found of each name."""
    found: dict[str, Path] = {}
    for folder in recipe_dirs():
        for path in sorted(folder.glob("*.yaml")):
            found.setdefault(path.stem, path)
    return [found[k] for k in sorted(found)]


def find_recipe(name: str | Path) -> Path:
    """A recipe file by path, or by name (``cifar_resnet20-w4a4-brevitas``)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in list_recipes():
        if candidate.stem == str(name) or candidate.name == str(name):
            return candidate
    known = ", ".join(p.stem for p in list_recipes()) or "none found"
    raise BzqError(f"no recipe '{name}' (known: {known}).")


def _field_types() -> dict[str, tuple[type, bool]]:
    """key -> (base type, None allowed) for every recipe key: PipelineConfig fields, quantization and synthesis
    settings."""
    from ._pipeline import SYNTHESIS_KEYS, PipelineConfig
    from .quant._registry import quant_keys
    from .synth import SynthesisConfig

    hints = {**typing.get_type_hints(SynthesisConfig), **quant_keys(), **typing.get_type_hints(PipelineConfig)}
    own = [f.name for f in dataclasses.fields(PipelineConfig) if f.name not in ("quant", "synthesis")]
    keys = own + sorted(quant_keys()) + sorted(SYNTHESIS_KEYS)
    types_ = {}
    for key in keys:
        hint = hints[key]
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else ()
        types_[key] = (next((a for a in args if a is not type(None)), hint), type(None) in args)
    return types_


def _check_type(key: str, value, base: type, nullable: bool, where: str):
    if value is None and nullable:
        return None
    if base is bool and isinstance(value, bool):
        return value
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if base in (str, Path) and isinstance(value, str | int | float) and not isinstance(value, bool):
        return base(str(value))
    raise BzqError(f"{where}: '{key}' must be {base.__name__}{' or null' if nullable else ''}, not {value!r}.")


def parse_quant_settings(items: list[str]) -> dict:
    """``key=value`` settings of the backends' configs (`bzq quantize --set`), typed as in a recipe."""
    from .quant._registry import quant_keys

    options, settings = _field_types(), {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in quant_keys():
            known = ", ".join(sorted(quant_keys()))
            raise BzqError(f"--set '{item}': expected KEY=VALUE with a quantization setting ({known}).")
        settings[key] = _check_type(key, yaml.safe_load(value), *options[key], f"--set {item}")
    return settings


def _lines(text: str, path: Path) -> dict[str, int]:
    """Line number of each top-level key; a key given twice is refused (YAML would keep the last silently)."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if not isinstance(node, yaml.MappingNode):
        return {}
    lines: dict[str, int] = {}
    for k, _ in node.value:
        if k.value in lines:
            raise BzqError(
                f"{path}:{k.start_mark.line + 1}: '{k.value}' is given twice (first on line {lines[k.value]})."
            )
        lines[k.value] = k.start_mark.line + 1
    return lines


def load_recipe(path: str | Path, overrides: list[str] = ()) -> tuple["PipelineConfig", dict]:  # noqa: F821
    """Read and validate a recipe, with ``key=value`` overrides: the PipelineConfig it is, and its information keys."""
    from ._pipeline import SYNTHESIS_KEYS, PipelineConfig
    from .quant._registry import quant_keys

    path = Path(path)
    try:
        text = path.read_text()
        lines = _lines(text, path)
        data = yaml.safe_load(text)
    except OSError as e:
        raise BzqError(f"cannot read recipe '{path}': {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise BzqError(f"{where}: not valid YAML ({problem}).") from None
    if not isinstance(data, dict):
        raise BzqError(f"{path}: a recipe is a flat YAML mapping of `bzq quantize` options.")
    options = _field_types()
    info, chosen, wheres = {}, {}, {}
    items = [(k, v, f"{path}:{lines.get(k, '?')}") for k, v in data.items()]
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise BzqError(f"--set '{item}': expected key=value.")
        items.append((key.strip().replace("-", "_"), yaml.safe_load(value), f"--set {item}"))
    for key, value, where in items:
        key = str(key)
        wheres[key] = where
        if key in RECIPE_INFO_KEYS:
            info[key] = _check_type(key, value, RECIPE_INFO_KEYS[key], True, where)
        elif key in options:
            base, nullable = options[key]
            chosen[key] = _check_type(key, value, base, nullable, where)
        else:
            near = [k for k in options if k.split("_")[0] == key.split("_")[0] or k.startswith(key[:3])]
            hint = f" (did you mean {', '.join(near[:3])}?)" if near else ""
            raise BzqError(f"{where}: unknown key '{key}'{hint}; recipes take `bzq quantize` options.")
    if "model" not in chosen:
        raise BzqError(f"{path}: the recipe names no 'model'.")
    synthesis = {k: chosen.pop(k) for k in list(chosen) if k in SYNTHESIS_KEYS}
    quant = {k: chosen.pop(k) for k in list(chosen) if k in quant_keys()}
    chosen.setdefault("out", Path(path.stem))
    try:
        return PipelineConfig(**chosen, quant=quant, synthesis=synthesis), info
    except BzqError as e:
        keys = ("w_bits", "a_bits", "backend", *quant, *synthesis)
        key = next((k for k in keys if str(e).startswith(k) and k in wheres), None)
        key = key or next((k for k in keys if wheres.get(k, "").startswith("--set")), None)
        key = key or next((k for k in keys if k in wheres), None)
        raise BzqError(f"{wheres[key]}: {e}" if key else f"{path}: {e}") from None


def recipe_hint(config: "PipelineConfig") -> str | None:  # noqa: F821
    """A line pointing to the tested recipe for ``config``'s model and scheme (``MODEL-wWaA-BACKEND``) when the run
    calibrates on the same source but differs from it in a setting the recipe chooses (images, synthesis or
    quantization); else None."""
    import timm

    from .synth import SynthesisConfig

    name = f"{config.model}-w{config.w_bits}a{config.a_bits}-{config.backend}"
    try:
        recipe, info = load_recipe(find_recipe(name))
    except BzqError:  # no such recipe, or a broken one of the user's ($BZQ_RECIPES): never stops the run
        return None
    if recipe.calib != config.calib:
        return None
    ours, theirs = SynthesisConfig(**config.synthesis), SynthesisConfig(**recipe.synthesis)
    pretrained = timm.models.get_pretrained_cfg(config.model)  # the input size, without building the model
    if pretrained is not None:  # iterations and low_res resolve by input size, often to the recipe's values
        side = min(pretrained.input_size[1:])
        ours, theirs = ours.for_input(side), theirs.for_input(side)
    quant, recipe_quant = dataclasses.asdict(config.quant_config()), dataclasses.asdict(recipe.quant_config())
    differ = [f"images={recipe.images}"] if config.images != recipe.images else []
    # a None left (no input size known: hf-hub:, local-dir:) may resolve to the recipe's value: not a difference
    differ += [f"{k}={v}" for k, v in recipe.synthesis.items() if getattr(ours, k) not in (None, getattr(theirs, k))]
    differ += [f"{k}={recipe_quant[k]}" for k in recipe.quant if quant[k] != recipe_quant[k]]
    if not differ:
        return None
    expected = f" (measured top-1 {info['expected_top1']:.1f})" if "expected_top1" in info else ""
    return f"the tested recipe {name}{expected} sets {', '.join(differ)}: bzq recipe run {name}"
