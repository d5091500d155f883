"""`crepe prune`: oneshot with the plugin registered, saved atomically and verified."""

from __future__ import annotations

import re
import time
from pathlib import Path

from loguru import logger

from .outputs import INCOMPLETE_MARKER, OutputError, atomic_output  # noqa: F401  (re-exported)

__all__ = ["RecipeError", "OutputError", "load_recipe", "resolve_model", "prune", "atomic_output", "INCOMPLETE_MARKER"]


class RecipeError(ValueError):
    """The recipe is unusable."""


_STAGE_KEY = re.compile(r".+_stage(_\d+)?$")


def check_recipe_dict(obj, where: str) -> None:
    """Refuse what llm-compressor would silently drop or misread.

    It reads only top-level keys ending in '_stage' (and 'args'), and inside a stage only
    groups ending in '_modifiers'; anything else is ignored, so one misspelled key drops a
    whole stage. Each modifier's fields: ``_check_modifier_args``.
    """
    if obj is None or (isinstance(obj, (dict, list, str)) and not obj):
        raise RecipeError(f"recipe {where} is empty")
    if not isinstance(obj, dict):
        raise RecipeError(f"recipe {where}: expected a mapping of '<name>_stage:' keys, got {type(obj).__name__}")
    for key, stage in obj.items():
        if key == "args":
            continue
        if not _STAGE_KEY.match(str(key)):
            raise RecipeError(
                f"recipe {where}: top-level key '{key}' does not end in '_stage'; llm-compressor would "
                "silently ignore it (e.g. sparsity_stage:)"
            )
        if not isinstance(stage, dict):
            raise RecipeError(f"recipe {where}: stage '{key}' must be a mapping of '<name>_modifiers:' groups")
        for group, mods in stage.items():
            if not str(group).endswith("_modifiers"):
                raise RecipeError(
                    f"recipe {where}: key '{key}.{group}' does not end in '_modifiers'; llm-compressor "
                    "would silently ignore it (e.g. sparsity_modifiers:)"
                )
            if not isinstance(mods, dict) or not mods:
                raise RecipeError(f"recipe {where}: group '{key}.{group}' holds no modifier")
            for name, args in mods.items():
                if isinstance(args, dict):
                    _check_modifier_args(name, args, where)


def _check_modifier_args(name: str, args: dict, where: str) -> None:
    """One modifier's fields, for any modifier: a 're:' entry of targets / ignore (or a
    sparsity-map key) must compile; an unquoted ``mask_structure: 2:4`` is read by YAML as the
    number 124."""
    from .core.errors import PruningError
    from .core.layers import check_name_patterns

    sparsity = args.get("sparsity")
    for fld, entries in (("targets", args.get("targets")), ("ignore", args.get("ignore")),
                         ("sparsity", list(sparsity) if isinstance(sparsity, dict) else None)):  # fmt: skip
        try:
            check_name_patterns(entries, f"{name}.{fld}")
        except PruningError as e:
            raise RecipeError(f"recipe {where}: {e}") from None
    ms = args.get("mask_structure")
    if isinstance(ms, (int, float)):
        raise RecipeError(
            f"recipe {where}: {name}.mask_structure was read as the number {ms}: YAML reads an "
            'unquoted 2:4 as a base-60 number; quote it: mask_structure: "2:4"'
        )


def read_yaml(text: str, where: str):
    """YAML, refusing a mapping that names a key twice (YAML keeps the last one silently, so a
    second ``CRePEPruningModifier:`` or a field written twice would drop the first)."""
    import yaml

    class _Strict(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        lines: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor': merged keys may be overridden
                continue
            key = loader.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in lines:
                    raise RecipeError(f"recipe {where}: key '{key}' appears twice (lines {lines[key]} and {line}); "
                                      "YAML would keep only the second")  # fmt: skip
                lines[key] = line
            except TypeError:  # an unhashable key: YAML itself refuses it below
                pass
        return loader.construct_mapping(node, deep)

    _Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        return yaml.load(text, Loader=_Strict)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {where} is not valid YAML: {' '.join(str(e).split())}") from None


def load_recipe(recipe):
    """Parse a recipe (path, YAML string, Recipe or modifiers) and refuse one with no modifier,
    or with keys llm-compressor would silently ignore (``check_recipe_dict``)."""
    from . import modifiers  # noqa: F401  (registers our modifiers with llm-compressor)
    from .compat.llmcompressor import UnknownModifierError, create_recipe

    if isinstance(recipe, (str, Path)):
        text_given = "\n" in str(recipe) or (isinstance(recipe, str) and str(recipe).lstrip().startswith("{"))
        if not text_given and not Path(recipe).is_file():
            what = "is a directory, not a recipe file" if Path(recipe).is_dir() else "no such file"
            raise RecipeError(f"recipe {str(recipe)!r}: {what}")
        where = "(inline)" if text_given else str(recipe)
        try:
            text = str(recipe) if text_given else Path(recipe).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise RecipeError(f"recipe {where} is not UTF-8 text (byte at offset {e.start}); a recipe is a YAML file") from None
        check_recipe_dict(read_yaml(text, where), where)
    try:
        r = create_recipe(str(recipe) if isinstance(recipe, Path) else recipe)
    except UnknownModifierError as e:
        names = ", ".join(e.registered)
        raise RecipeError(f"recipe {recipe!s:.200}: {e.message}; registered out-of-tree modifiers: {names}") from None
    if not r.modifiers:
        raise RecipeError(
            f"recipe {recipe!s:.200} yields no modifier: llm-compressor only reads top-level keys "
            "ending in '_stage' holding groups ending in '_modifiers' (e.g. sparsity_stage: "
            "sparsity_modifiers: CRePEPruningModifier: ...)"
        )
    return r


def _refuse_idle_pruners(r, recipe) -> None:
    """A pruner whose sparsity is 0 for every layer prunes nothing, and the save would then fail
    verification for want of a record, after the whole calibration: say so when the recipe is read."""
    from .core import parse_structure
    from .modifiers import CRePEPruningModifier

    for m in r.modifiers:
        if isinstance(m, CRePEPruningModifier) and m.prunes_nothing:
            n, mm = parse_structure(m.mask_structure)
            raise RecipeError(
                f"recipe {recipe!s:.200}: {type(m).__name__}.sparsity is 0 for every layer, so mask_structure "
                f"'{m.mask_structure}' would prune nothing; give {f'N/M = {n / mm:g}' if n else 'a fraction in (0, 1)'} "
                "or remove the modifier"
            )


def resolve_model(model: str) -> str:
    """'smollm2' / 'gemma3-270m' are the PyPI-shipped real models; anything else is a path or hub name."""
    if model.lower() in ("smollm2", "smollm2-135m", "smollm2-135m-instruct"):
        from .models import smollm2_path

        return str(smollm2_path())
    if model.lower() in ("gemma3-270m", "gemma-3-270m"):
        from .models import gemma3_path

        return str(gemma3_path())
    return model


def local_model_dir(model: str) -> Path | None:
    """The folder a model is read from: a local path, or a hub name's cache folder."""
    if Path(model).exists():
        return Path(model).resolve()
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        return None
    d = Path(HF_HUB_CACHE) / f"models--{model.replace('/', '--')}"
    return d if "/" in model and d.is_dir() else None


def input_paths(model: str, recipe=None, calib: str | None = None) -> list[tuple[str, Path]]:
    """(what, path) of every local input a command reads: no output may be, hold or lie inside one."""
    from .data import split_source

    found = []
    if (m := local_model_dir(model)) is not None:
        found.append(("source model", m))
    if isinstance(recipe, (str, Path)) and "\n" not in str(recipe) and Path(recipe).is_file():
        found.append(("recipe", Path(recipe)))
    if calib and Path(split_source(calib)[0]).exists():
        found.append(("calibration text", Path(split_source(calib)[0])))
    return found


def prune(
    model: str,
    recipe,
    calib: str,
    out: str | Path,
    num_samples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    overwrite: bool = False,
    save_compressed: bool = True,
) -> dict:
    """Run oneshot and save to ``out`` atomically; the result is verified before it is kept."""
    from llmcompressor import oneshot

    from .checkpoint.save import save_pruned
    from .checkpoint.verify import verify_checkpoint
    from .data import calibration_dataset, collate_one, image_text_dataset
    from .models import check_model, is_vision_language, load_checkpoint, load_processor, text_tokenizer

    model = resolve_model(model)
    sink = atomic_output(out, overwrite, inputs=input_paths(model, recipe, calib))  # checked before any work
    r = load_recipe(recipe)
    _refuse_idle_pruners(r, recipe)
    check_model(model)
    processor = load_processor(model)  # a vision-language model's processor is saved with it
    tok = text_tokenizer(processor)
    try:
        from transformers import AutoConfig

        limit = getattr(AutoConfig.from_pretrained(model).get_text_config(), "max_position_embeddings", None)
    except (OSError, ValueError):
        limit = None
    images = image_text_dataset(calib, processor, num_samples, seed) if is_vision_language(model) else None
    ds = images if images is not None else calibration_dataset(calib, tok, num_samples, seqlen, seed, max_positions=limit)
    with sink as tmp:
        t0 = time.perf_counter()
        loaded = load_checkpoint(model)
        extra = {} if images is None else {"data_collator": collate_one}
        pruned = oneshot(model=loaded, processor=processor, dataset=ds, recipe=r, num_calibration_samples=len(ds),
                         max_seq_length=seqlen, save_compressed=save_compressed, **extra)  # fmt: skip
        seconds = time.perf_counter() - t0
        renamed = save_pruned(pruned, processor, tmp, save_compressed)
        if renamed:
            logger.info(f"{len(renamed)} recorded modules named as transformers saved them "
                        f"(e.g. {next(iter(renamed))} -> {next(iter(renamed.values()))})")  # fmt: skip
        (tmp / INCOMPLETE_MARKER).unlink()  # written in full; now it must verify
        # a recipe with one of our pruners must leave a record; others (Wanda, SparseGPT) are only reported
        from .modifiers import CRePEPruningModifier

        ours = any(isinstance(m, CRePEPruningModifier) for m in r.modifiers)
        from .checkpoint.verify import CheckpointError
        from .core.errors import PruningError

        try:  # messages name OUT, not the temporary directory that is about to disappear
            report = verify_checkpoint(tmp, require_record=ours)
        except CheckpointError as e:
            raise CheckpointError("the saved checkpoint failed verification, so it was not kept: "
                                  + str(e).replace(str(tmp), str(sink.out))) from None  # fmt: skip
        if not report.ok:
            raise PruningError("the saved checkpoint failed verification, so it was not kept: " + "; ".join(report.errors))
    logger.info(f"saved {out} in {seconds:.1f}s ({len(report.layers)} layers verified)")
    return {"out": str(Path(out).resolve()), "seconds": seconds, "record": report.record}
