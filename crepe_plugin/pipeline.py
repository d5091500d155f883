"""`crepe prune`: oneshot with the plugin registered, saved atomically and verified."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from loguru import logger

__all__ = ["RecipeError", "load_recipe", "resolve_model", "prune", "atomic_output"]

INCOMPLETE_MARKER = ".crepe-incomplete"


class RecipeError(ValueError):
    """The recipe is unusable."""


_STAGE_KEY = re.compile(r".+_stage(_\d+)?$")


def check_recipe_dict(obj, where: str) -> None:
    """Refuse what llm-compressor would silently drop or misread.

    It reads only top-level keys ending in '_stage' (and 'args'), and inside a stage only
    groups ending in '_modifiers'; anything else is ignored, so one misspelled key drops a
    whole stage. An unquoted ``mask_structure: 2:4`` is read by YAML as the number 124.
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
                ms = (args or {}).get("mask_structure") if isinstance(args, dict) else None
                if isinstance(ms, (int, float)):
                    raise RecipeError(
                        f"recipe {where}: {name}.mask_structure was read as the number {ms}: YAML reads an "
                        'unquoted 2:4 as a base-60 number; quote it: mask_structure: "2:4"'
                    )


def load_recipe(recipe):
    """Parse a recipe (path, YAML string, Recipe or modifiers) and refuse one with no modifier,
    or with keys llm-compressor would silently ignore (``check_recipe_dict``)."""
    from . import modifiers  # noqa: F401  (registers our modifiers with llm-compressor)
    import yaml

    from .compat.llmcompressor import UnknownModifierError, create_recipe

    if isinstance(recipe, (str, Path)):
        text_given = "\n" in str(recipe) or (isinstance(recipe, str) and str(recipe).lstrip().startswith("{"))
        if not text_given and not Path(recipe).is_file():
            raise RecipeError(f"recipe {str(recipe)!r}: no such file")
        where = "(inline)" if text_given else str(recipe)
        text = str(recipe) if text_given else Path(recipe).read_text(encoding="utf-8")
        try:
            obj = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise RecipeError(f"recipe {where} is not valid YAML: {' '.join(str(e).split())}") from None
        check_recipe_dict(obj, where)
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


def resolve_model(model: str) -> str:
    """'smollm2' / 'gemma3-270m' are the PyPI-shipped real models; anything else is a path or hub name."""
    if model.lower() in ("smollm2", "smollm2-135m", "smollm2-135m-instruct"):
        from .models import smollm2_path

        return str(smollm2_path())
    if model.lower() in ("gemma3-270m", "gemma-3-270m"):
        from .models import gemma3_path

        return str(gemma3_path())
    return model


def _fsync_tree(d: Path) -> None:
    """Flush every file under ``d`` and the directories themselves to disk."""
    for f in sorted(d.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    for sub in [d, *sorted(x for x in d.rglob("*") if x.is_dir())]:
        _fsync_dir(sub)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class atomic_output:
    """Context manager: write into a hidden sibling directory, rename onto ``out`` on success.

    - An interrupted run (exception, Ctrl-C, SIGTERM) leaves no ``out`` and removes its own
      temporary directory; a killed one leaves only ``.NAME.tmp-PID`` marked incomplete, which
      the next run into the same ``out`` removes.
    - The written files and directories are fsynced before the rename.
    - With ``overwrite``, the old checkpoint is first renamed to ``.NAME.old-PID`` and the new
      one renamed into place; the old one is removed only after that. A crash between the two
      renames leaves the new checkpoint complete in ``.NAME.tmp-PID`` and the old one in
      ``.NAME.old-PID``: the next run moves the old one back before it starts, so ``out``
      is never lost.
    """

    def __init__(self, out: str | Path, overwrite: bool = False):
        self.out = Path(out).resolve()
        self._recover()
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"{self.out} exists; pass --overwrite to replace it")
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        self._old_handler = None

    def _siblings(self, kind: str) -> list[Path]:
        if not self.out.parent.is_dir():
            return []
        return sorted(self.out.parent.glob(f".{self.out.name}.{kind}-*"))

    def _recover(self) -> None:
        """Undo what a killed earlier run left: restore an old checkpoint whose replacement
        never arrived, and delete temporary directories marked incomplete."""
        olds = self._siblings("old")
        if olds and not self.out.exists():
            os.replace(olds[-1], self.out)
            logger.warning(f"restored {self.out} from {olds[-1].name}, left by an interrupted --overwrite")
            olds = olds[:-1]
        for d in olds:
            shutil.rmtree(d, ignore_errors=True)
        for d in self._siblings("tmp"):
            if (d / INCOMPLETE_MARKER).exists() or not any(d.iterdir()):
                shutil.rmtree(d, ignore_errors=True)

    def _on_sigterm(self, signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def __enter__(self) -> Path:
        import signal
        import threading

        self.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        (self.tmp / INCOMPLETE_MARKER).write_text("interrupted save; do not use\n")
        if threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)  # clean up as for Ctrl-C
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        import signal

        if self._old_handler is not None:
            signal.signal(signal.SIGTERM, self._old_handler)
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        (self.tmp / INCOMPLETE_MARKER).unlink(missing_ok=True)
        _fsync_tree(self.tmp)
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        _fsync_dir(self.out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


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
    from .models import is_vision_language, load_processor, model_class, text_tokenizer

    r = load_recipe(recipe)
    model = resolve_model(model)
    if Path(model).exists() and not (Path(model) / "config.json").is_file():
        raise RecipeError(f"{model} is not a model directory (no config.json)")
    processor = load_processor(model)  # a vision-language model's processor is saved with it
    tok = text_tokenizer(processor)
    try:
        from transformers import AutoConfig

        limit = getattr(AutoConfig.from_pretrained(model).get_text_config(), "max_position_embeddings", None)
    except (OSError, ValueError):
        limit = None
    images = image_text_dataset(calib, processor, num_samples, seed) if is_vision_language(model) else None
    ds = images if images is not None else calibration_dataset(calib, tok, num_samples, seqlen, seed, max_positions=limit)
    with atomic_output(out, overwrite) as tmp:
        t0 = time.perf_counter()
        loaded = model_class(model).from_pretrained(model, dtype="auto")
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
        report = verify_checkpoint(tmp, require_record=ours)
        if not report.ok:
            from .core.errors import PruningError

            raise PruningError("the saved checkpoint failed verification, so it was not kept: " + "; ".join(report.errors))
    logger.info(f"saved {out} in {seconds:.1f}s ({len(report.layers)} layers verified)")
    return {"out": str(Path(out).resolve()), "seconds": seconds, "record": report.record}
