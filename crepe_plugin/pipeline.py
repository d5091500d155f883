"""`crepe prune`: oneshot with the plugin registered, saved atomically and verified."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from loguru import logger

__all__ = ["RecipeError", "load_recipe", "resolve_model", "prune", "atomic_output"]

INCOMPLETE_MARKER = ".crepe-incomplete"


class RecipeError(ValueError):
    """The recipe is unusable."""


def load_recipe(recipe):
    """Parse a recipe (path, YAML string, Recipe or modifiers) and refuse one with no modifier.

    llm-compressor silently ignores keys not named ``*_stage`` / ``*_modifiers`` and would
    then save the unpruned model.
    """
    import crepe_plugin  # noqa: F401  registers our modifiers
    from llmcompressor.recipe import Recipe

    if isinstance(recipe, (str, Path)) and not Path(recipe).is_file() and "\n" not in str(recipe):
        raise RecipeError(f"recipe {recipe!r}: no such file")
    r = Recipe.create_instance(str(recipe) if isinstance(recipe, Path) else recipe)
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


class atomic_output:
    """Context manager: write into a hidden sibling directory, rename onto ``out`` on success.

    An interrupted run leaves only the hidden directory, marked incomplete, never ``out``.
    """

    def __init__(self, out: str | Path, overwrite: bool = False):
        self.out = Path(out).resolve()
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"{self.out} exists; pass --overwrite to replace it")
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        (self.tmp / INCOMPLETE_MARKER).write_text("interrupted save; do not use\n")
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        (self.tmp / INCOMPLETE_MARKER).unlink(missing_ok=True)
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
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
    from transformers import AutoTokenizer

    from .data import calibration_dataset
    from .verify import verify_checkpoint

    r = load_recipe(recipe)
    model = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(model)
    ds = calibration_dataset(calib, tok, num_samples, seqlen, seed)
    with atomic_output(out, overwrite) as tmp:
        t0 = time.perf_counter()
        oneshot(
            model=model,
            tokenizer=tok,
            dataset=ds,
            recipe=r,
            num_calibration_samples=num_samples,
            max_seq_length=seqlen,
            output_dir=str(tmp),
            save_compressed=save_compressed,
        )
        seconds = time.perf_counter() - t0
        (tmp / INCOMPLETE_MARKER).unlink()  # written in full; now it must verify
        report = verify_checkpoint(tmp)
        if not report.ok:
            raise RuntimeError("saved checkpoint failed verification: " + "; ".join(report.errors))
    logger.info(f"saved {out} in {seconds:.1f}s ({len(report.layers)} layers verified)")
    return {"out": str(Path(out).resolve()), "seconds": seconds, "record": report.record}
