"""The `crepe` command. Thin: every subcommand calls a library function."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__  # cheap: the package imports nothing heavy

EPILOG = """examples:
  crepe demo
  crepe prune ./Llama-3.2-1B --recipe recipes/crepe_2of4.yaml --calib wiki.valid.tokens.txt --out ./llama-crepe-2of4
  crepe prune meta-llama/Llama-3.2-1B --recipe recipes/crepe_2of4.yaml --calib wikitext:wikitext-2-raw-v1 --out out
  crepe eval ./llama-crepe-2of4 --text wiki.test.raw.txt --seqlen 1024 --max-segments 16
  crepe verify ./llama-crepe-2of4
  crepe search smollm2 --calib 'wiki.valid.tokens.txt[:0.75]' --structure 2:4 --trials 60 --proxy energy --out pho-run
  crepe search-validate pho-run --eval 'wiki.valid.tokens.txt[0.75:]' --samples 30

text sources: a file, a local dataset dir or a hub dataset 'name[:config]'; a file may end in a
fractional slice, FILE[lo:hi] (cut at line starts). The project's protocol: calibration =
wiki.valid.tokens.txt[:0.75], validation (every choice) = wiki.valid.tokens.txt[0.75:],
test (reporting only) = wiki.test.raw.txt.
  crepe serve-check ./llama-crepe-2of4        (in the vLLM environment)
"""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one `error:` line (exit 2), as every other bad input."""

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _subcommand(sub, name: str, help: str, epilog: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)


def _parser() -> argparse.ArgumentParser:
    from .vllm.check import add_arguments as add_serve_check_arguments  # stdlib only at import

    p = _Parser(prog="crepe", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                description="CRePE / RIA pruning for llm-compressor, with checkpoints vLLM serves as they are.")  # fmt: skip
    p.add_argument("--version", action="version", version=f"crepe-plugin {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    _prune_arguments(sub)
    _eval_arguments(sub)
    _verify_arguments(sub)
    add_serve_check_arguments(_subcommand(
        sub, "serve-check", "serve a checkpoint in vLLM (serve env): greedy tokens vs transformers, OpenAI server",
        "example:\n  crepe serve-check smol-2of4 --prompts 'Hello' 'The sky is'"))  # fmt: skip
    _search_arguments(sub)
    _search_validate_arguments(sub)
    _demo_arguments(sub)
    return p


def _prune_arguments(sub) -> None:
    pr = _subcommand(sub, "prune", "prune (and quantize) a model with a YAML recipe",
                     "example:\n  crepe prune smollm2 --recipe recipes/crepe_2of4.yaml --calib wiki.valid.tokens.txt --out smol-2of4")  # fmt: skip
    pr.add_argument("model", help="local directory, hub name, or 'smollm2' (embedded)")
    pr.add_argument("--recipe", required=True, help="llm-compressor YAML recipe")
    pr.add_argument("--calib", required=True, help="text file, local dataset dir, or hub dataset 'name[:config]'")
    pr.add_argument("--out", required=True, help="output directory (written atomically)")
    pr.add_argument("--num-samples", type=int, default=128)
    pr.add_argument("--seqlen", type=int, default=2048)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--overwrite", action="store_true",
                    help="replace --out if it is an earlier crepe output or an empty directory")  # fmt: skip


DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")


def _eval_arguments(sub) -> None:
    ev = _subcommand(sub, "eval", "perplexity (non-overlapping segments, exp of mean NLL)",
                     "example:\n  crepe eval smol-2of4 --text wiki.test.raw.txt --seqlen 1024 --max-segments 16")  # fmt: skip
    ev.add_argument("model")
    ev.add_argument("--text", required=True, help="text file, local dataset dir, or hub dataset 'name[:config]'")
    ev.add_argument("--split", default="test")
    ev.add_argument("--seqlen", type=int, default=1024)
    ev.add_argument("--max-segments", type=int, default=None)
    ev.add_argument("--dtype", default="float32", help=f"one of {', '.join(DTYPES)}")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--json", action="store_true", help="print a JSON line")


def _verify_arguments(sub) -> None:
    ve = _subcommand(sub, "verify", "check per-layer N:M structure and density from the safetensors",
                     "example:\n  crepe verify smol-2of4")  # fmt: skip
    ve.add_argument("dir")
    ve.add_argument("--structure", default=None, help="pattern to report unrecorded layers against (default 2:4)")
    ve.add_argument("--json", action="store_true")
    ve.add_argument("--require-record", action="store_true", help="fail (exit 1) when no layer is recorded as pruned")


def _search_arguments(sub) -> None:
    from .pho.config import PROXY_NAMES  # pydantic only

    se = _subcommand(sub, "search", "PHO: search CRePE's coefficients against a cheap proxy (Optuna CMA-ES)", (
        "examples:\n  crepe search smollm2 --calib wiki.valid.tokens.txt --structure 2:4 --trials 60 --proxy energy --out pho-run\n"
        "  crepe search smollm2 --calib wiki.valid.tokens.txt --structure 2:4 --trials 60 --proxy ppl --out pho-run   (baseline)\n"
        "  two processes, one search:  crepe search ... --storage postgresql://user@host/db --study my-search  (on each)"))  # fmt: skip
    se.add_argument("model", help="local directory, hub name, or 'smollm2' (embedded)")
    se.add_argument("--calib", required=True, help="text file, local dataset dir, or hub dataset 'name[:config]'")
    se.add_argument("--structure", default="2:4", help="N:M, or 0:0 for unstructured (then give --sparsity)")
    se.add_argument("--sparsity", type=float, default=None)
    se.add_argument("--scope", default=None, choices=["matrix", "row"], help="unstructured only (default: row, the modifier's)")
    se.add_argument("--ignore", nargs="+", default=[],
                    help="layers left out besides the modifier's default ignores (lm_head, MoE routers, vision "
                         "tower and projector): name suffixes or 're:' regexes")  # fmt: skip
    se.add_argument("--trials", type=int, default=60, help="finished trials the study should hold (resumes)")
    se.add_argument("--proxy", default="energy", choices=PROXY_NAMES)
    se.add_argument("--sampler", default=None, choices=["cmaes", "hillclimb", "random"])
    se.add_argument("--out", required=True, help="directory for the study, cache, results and report")
    se.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///OUT/pho.db)")
    se.add_argument("--study", default=None, help="study name (default from structure, sparsity and proxy)")
    se.add_argument("--layers", default="6", help="decoder layers the proxy samples, or 'all'")
    se.add_argument("--bounds", default=None, help='JSON bounds, e.g. \'{"neighbor_coef": {"low": 0, "high": 2}}\'')
    se.add_argument("--num-samples", type=int, default=64)
    se.add_argument("--seqlen", type=int, default=512)
    se.add_argument("--seed", type=int, default=0)


def _search_validate_arguments(sub) -> None:
    from .pho.config import PROXY_NAMES  # pydantic only

    sv = _subcommand(sub, "search-validate", "PHO report: proxies against held-out perplexity over sampled configurations",
                     "example:\n  crepe search-validate pho-run --eval 'wiki.valid.tokens.txt[0.75:]' --samples 30")  # fmt: skip
    sv.add_argument("dir", help="a `crepe search --out` directory")
    sv.add_argument("--eval", default=None,
                    help="validation text (default: the last 25%% of WikiText-2 valid); the test text is refused")  # fmt: skip
    sv.add_argument("--allow-test-text", action="store_true", help="validate on test text anyway (loud warning)")
    sv.add_argument("--samples", type=int, default=30)
    sv.add_argument("--eval-seqlen", type=int, default=1024)
    sv.add_argument("--eval-segments", type=int, default=8)
    sv.add_argument("--seed", type=int, default=1)
    sv.add_argument("--proxies", default=",".join(PROXY_NAMES), help="proxies to record (ppl runs the model: slow)")


def _demo_arguments(sub) -> None:
    de = _subcommand(sub, "demo", "SmolLM2-135M at 2:4: SparseGPT and the best recipe (saved, verified); --full adds Wanda and CRePE's defaults",
                     "example:\n  crepe demo --out crepe-demo\n  crepe demo --full    (also Wanda and CRePE's defaults)\n"
                     "  crepe demo --quick   (without the SparseGPT row)")  # fmt: skip
    de.add_argument("--out", default="crepe-demo")
    de.add_argument("--data-dir", default=None, help="folder holding wikitext2/ (default: $CREPE_DATA_DIR or ../shared/data)")
    de.add_argument("--num-samples", type=int, default=64)
    de.add_argument("--seqlen", type=int, default=512)
    de.add_argument("--eval-seqlen", type=int, default=1024)
    de.add_argument("--max-segments", type=int, default=16)
    de.add_argument("--quick", action="store_true", help="skip the SparseGPT row (the slowest baseline)")
    de.add_argument("--full", action="store_true", help="also run Wanda and CRePE's scoring-only defaults (about 8 more minutes)")


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            args = _parser().parse_args(argv)
        except SystemExit as e:  # --help, --version, or a usage error (already printed as one line)
            return e.code if isinstance(e.code, int) else 2
        return _run(args)
    except KeyboardInterrupt:
        return _on_interrupt()
    except Exception as e:  # one clear line, not a traceback, for known input errors
        if _interrupted(e):  # Ctrl-C inside an import or a library that wrapped it
            return _on_interrupt()
        if isinstance(e, _known_errors()):
            print(f"error: {_one_line(e)}", file=sys.stderr)
            return 2
        raise


def _on_interrupt() -> int:
    """Ctrl-C: one line, exit 130. A Ctrl-C that landed inside C code running Python source (some
    extension modules do while they import) leaves CPython's "unhandled KeyboardInterrupt" flag
    set although we handled it, and the interpreter would then kill itself with SIGINT at exit
    (-2); running an empty statement through that same path clears the flag."""
    print("interrupted", file=sys.stderr)
    try:
        import ctypes

        ctypes.pythonapi.PyRun_SimpleString(b"")
    except (ImportError, AttributeError, OSError):  # not CPython
        pass
    return 130


def _interrupted(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _known_errors() -> tuple[type, ...]:
    """The input errors that end in one `error:` line and exit 2."""
    from .checkpoint.verify import CheckpointError
    from .core.errors import PruningError
    from .data import TestTextError, TextSourceError
    from .evaluate import EvalError
    from .models import ModelError
    from .outputs import OutputError
    from .pipeline import RecipeError

    known = (PruningError, RecipeError, CheckpointError, FileExistsError, FileNotFoundError, TestTextError, EvalError,
             UsageError, TextSourceError, OutputError, ModelError)  # fmt: skip
    try:
        from pydantic import ValidationError

        known = known + (ValidationError,)
    except ImportError:
        pass
    return known


class UsageError(ValueError):
    """A command-line argument is out of range."""


def _check_positive(args, *names: str) -> None:
    for name in names:
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")


def _one_line(e: Exception) -> str:
    """One line for the user: pydantic's first error as 'field: message', others flattened."""
    try:
        from pydantic import ValidationError

        if isinstance(e, ValidationError):
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err.get("loc", ()))
            return f"{e.title}: {loc}: {err['msg']}" if loc else f"{e.title}: {err['msg']}"
    except ImportError:
        pass
    return " ".join(str(e).split())


def _run(args) -> int:
    _check_positive(args, "num_samples", "seqlen", "max_segments", "trials", "samples", "eval_segments", "max_tokens",
                    "tensor_parallel_size")  # fmt: skip
    return COMMANDS[args.cmd](args)


def _verify(args) -> int:
    from .checkpoint.verify import verify_checkpoint

    rep = verify_checkpoint(args.dir, args.structure, require_record=args.require_record)
    recorded = [l for l in rep.layers if l.recorded]
    if args.json:
        print(json.dumps({"ok": rep.ok, "recorded_layers": len(recorded), "errors": rep.errors,
                          "layers": [l.__dict__ for l in rep.layers]}, default=str))  # fmt: skip
        return 0 if rep.ok else 1
    rec = rep.record
    print(f"{rep.path}: " + (f"record {rec.get('method', '-')} {rec.get('structure', '-')} ({len(recorded)} layers)" if rec else "no crepe_sparsity record"))
    print(rep.table())
    for e in rep.errors:
        print(f"error: {e}", file=sys.stderr)
    if not rep.ok:
        print("FAILED")
    elif not recorded:
        print("NOT VERIFIED: no layer is recorded as pruned, so nothing was checked against a record "
              "(the table only reports); --require-record makes this a failure")  # fmt: skip
    else:
        print(f"OK: {len(recorded)} recorded layers are what the record says")
    return 0 if rep.ok else 1


def _eval(args) -> int:
    if args.seqlen < 2:
        raise UsageError(f"--seqlen must be at least 2 (one prediction needs two tokens), got {args.seqlen}")
    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    import torch

    from .data import read_text
    from .evaluate import check_device, load_model, perplexity
    from .pipeline import resolve_model

    check_device(args.device)  # before the model loads
    text = read_text(args.text, args.split)  # before the model loads: a bad text fails fast
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tok = load_model(resolve_model(args.model), dtype=dtype, device=args.device)
    ppl = perplexity(model, tok, text, args.seqlen, args.max_segments)
    if args.json:
        print(json.dumps({"model": args.model, "perplexity": ppl, "seqlen": args.seqlen, "max_segments": args.max_segments}))
    else:
        print(f"perplexity {ppl:.4f} ({args.model}, seqlen {args.seqlen})")
    return 0


def _prune(args) -> int:
    from .pipeline import prune

    res = prune(args.model, args.recipe, args.calib, args.out, args.num_samples, args.seqlen, args.seed, args.overwrite)
    print(f"saved {res['out']} ({res['seconds']:.1f}s); run `crepe verify {res['out']}`")
    return 0


def _serve_check(args) -> int:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise UsageError("serve-check runs vLLM, which this environment lacks; run it in the serving one "
                         "(.venv-serve/bin/python -m crepe_plugin.cli serve-check ...)")  # fmt: skip
    from .vllm.check import run as serve_check

    return serve_check(args)


def _search(args) -> int:
    from .pho.api import search
    from .pho.config import SearchConfig, SearchSpace

    if args.layers != "all" and (not args.layers.isdigit() or int(args.layers) < 1):
        raise UsageError(f"--layers must be a positive integer or 'all', got {args.layers!r}")
    cfg = SearchConfig(
        proxy=args.proxy,
        trials=args.trials,
        sampler=args.sampler,
        storage=args.storage,
        study_name=args.study,
        seed=args.seed,
        layers="all" if args.layers == "all" else int(args.layers),
        bounds=SearchSpace(**_bounds(args.bounds)),
    )
    res = search(args.model, args.calib, args.structure, args.sparsity, cfg, args.out, args.num_samples, args.seqlen,
                 args.seed, scope=args.scope, ignore=tuple(args.ignore))  # fmt: skip
    print(json.dumps({k: res[k] for k in ("proxy", "value", "params", "trials", "trial_seconds", "study_name")}))
    print(f"wrote {args.out}/best_{args.proxy}.json, {args.out}/recipe_{args.proxy}.yaml and {args.out}/report.md")
    return 0


def _bounds(text: str | None) -> dict:
    """--bounds as a dict of parameter ranges ({} when not given)."""
    if not text:
        return {}
    try:
        bounds = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--bounds is not valid JSON ({e.msg} at character {e.pos}): {text!r}") from None
    if not isinstance(bounds, dict):
        raise UsageError(f"--bounds must be a JSON object of parameter ranges, got {text!r}")
    return bounds


def _search_validate(args) -> int:
    from .data import protocol, refuse_test_text
    from .pho.config import PROXY_NAMES as PROXIES
    from .pho.validate import validate

    text = args.eval
    if text is None:
        proto = protocol()
        if proto is None:
            raise FileNotFoundError("no --eval given and WikiText-2 valid not found; set CREPE_DATA_DIR or pass --eval")
        text = proto.validation
    refuse_test_text(text, "--eval", allow=args.allow_test_text)
    proxies = tuple(p for p in args.proxies.split(",") if p)
    unknown = [p for p in proxies if p not in PROXIES]
    if unknown or not proxies:
        raise UsageError(f"--proxies takes a comma-separated list of {', '.join(PROXIES)}; got {args.proxies!r}")
    path = validate(args.dir, text, args.samples, args.eval_seqlen, args.eval_segments, args.seed, proxies=proxies)
    print(f"wrote {path}")
    return 0


def _demo(args) -> int:
    from .demo import demo

    demo(args.out, args.data_dir, args.num_samples, args.seqlen, args.eval_seqlen, args.max_segments, quick=args.quick, full=args.full)
    return 0


COMMANDS = {"verify": _verify, "eval": _eval, "prune": _prune, "serve-check": _serve_check, "search": _search,
            "search-validate": _search_validate, "demo": _demo}  # fmt: skip

if __name__ == "__main__":
    sys.exit(main())
