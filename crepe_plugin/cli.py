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


def _parser() -> argparse.ArgumentParser:
    from .pho.config import PROXY_NAMES  # pydantic only
    from .vllm.check import add_arguments as add_serve_check_arguments  # stdlib only at import

    p = argparse.ArgumentParser(
        prog="crepe",
        description="CRePE / RIA pruning for llm-compressor, with checkpoints vLLM serves as they are.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"crepe-plugin {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    pr = sub.add_parser(
        "prune",
        help="prune (and quantize) a model with a YAML recipe",
        epilog="example:\n  crepe prune smollm2 --recipe recipes/crepe_2of4.yaml --calib wiki.valid.tokens.txt --out smol-2of4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pr.add_argument("model", help="local directory, hub name, or 'smollm2' (embedded)")
    pr.add_argument("--recipe", required=True, help="llm-compressor YAML recipe")
    pr.add_argument("--calib", required=True, help="text file, local dataset dir, or hub dataset 'name[:config]'")
    pr.add_argument("--out", required=True, help="output directory (written atomically)")
    pr.add_argument("--num-samples", type=int, default=128)
    pr.add_argument("--seqlen", type=int, default=2048)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--overwrite", action="store_true")

    ev = sub.add_parser(
        "eval",
        help="perplexity (non-overlapping segments, exp of mean NLL)",
        epilog="example:\n  crepe eval smol-2of4 --text wiki.test.raw.txt --seqlen 1024 --max-segments 16",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument("model")
    ev.add_argument("--text", required=True, help="text file, local dataset dir, or hub dataset 'name[:config]'")
    ev.add_argument("--split", default="test")
    ev.add_argument("--seqlen", type=int, default=1024)
    ev.add_argument("--max-segments", type=int, default=None)
    ev.add_argument("--dtype", default="float32")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--json", action="store_true", help="print a JSON line")

    ve = sub.add_parser(
        "verify",
        help="check per-layer N:M structure and density from the safetensors",
        epilog="example:\n  crepe verify smol-2of4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ve.add_argument("dir")
    ve.add_argument("--structure", default=None, help="pattern to report unrecorded layers against (default 2:4)")
    ve.add_argument("--json", action="store_true")
    ve.add_argument("--require-record", action="store_true", help="fail (exit 1) when no layer is recorded as pruned")

    sc = sub.add_parser(
        "serve-check",
        help="serve a checkpoint in vLLM (serve env): greedy tokens vs transformers, OpenAI server",
        epilog="example:\n  crepe serve-check smol-2of4 --prompts 'Hello' 'The sky is'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_serve_check_arguments(sc)

    se = sub.add_parser(
        "search",
        help="PHO: search CRePE's coefficients against a cheap proxy (Optuna CMA-ES)",
        epilog=(
            "examples:\n  crepe search smollm2 --calib wiki.valid.tokens.txt --structure 2:4 --trials 60 --proxy energy --out pho-run\n"
            "  crepe search smollm2 --calib wiki.valid.tokens.txt --structure 2:4 --trials 60 --proxy ppl --out pho-run   (baseline)\n"
            "  two processes, one search:  crepe search ... --storage postgresql://user@host/db --study my-search  (on each)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    se.add_argument("model", help="local directory, hub name, or 'smollm2' (embedded)")
    se.add_argument("--calib", required=True, help="text file, local dataset dir, or hub dataset 'name[:config]'")
    se.add_argument("--structure", default="2:4", help="N:M, or 0:0 for unstructured (then give --sparsity)")
    se.add_argument("--sparsity", type=float, default=None)
    se.add_argument("--scope", default="matrix", choices=["matrix", "row"], help="unstructured only")
    se.add_argument("--ignore", nargs="+", default=["lm_head"],
                    help="layers left out: name suffixes or 're:' regexes (default: lm_head)")  # fmt: skip
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

    sv = sub.add_parser(
        "search-validate",
        help="PHO report: proxies against held-out perplexity over sampled configurations",
        epilog="example:\n  crepe search-validate pho-run --eval 'wiki.valid.tokens.txt[0.75:]' --samples 30",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sv.add_argument("dir", help="a `crepe search --out` directory")
    sv.add_argument(
        "--eval",
        default=None,
        help="validation text (default: the last 25%% of WikiText-2 valid); the test text is refused",
    )
    sv.add_argument("--allow-test-text", action="store_true", help="validate on test text anyway (loud warning)")
    sv.add_argument("--samples", type=int, default=30)
    sv.add_argument("--eval-seqlen", type=int, default=1024)
    sv.add_argument("--eval-segments", type=int, default=8)
    sv.add_argument("--seed", type=int, default=1)
    sv.add_argument("--proxies", default=",".join(PROXY_NAMES), help="proxies to record (ppl runs the model: slow)")

    de = sub.add_parser(
        "demo",
        help="SmolLM2-135M at 2:4: Wanda, SparseGPT, CRePE's defaults and the best recipe (saved, verified)",
        epilog="example:\n  crepe demo --out crepe-demo\n  crepe demo --quick   (without the SparseGPT row)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    de.add_argument("--out", default="crepe-demo")
    de.add_argument("--data-dir", default=None, help="folder holding wikitext2/ (default: $CREPE_DATA_DIR or ../shared/data)")
    de.add_argument("--num-samples", type=int, default=64)
    de.add_argument("--seqlen", type=int, default=512)
    de.add_argument("--eval-seqlen", type=int, default=1024)
    de.add_argument("--max-segments", type=int, default=16)
    de.add_argument("--quick", action="store_true", help="skip the SparseGPT row (the slowest baseline)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(_parser().parse_args(argv))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line, not a traceback, for known input errors
        from .core.errors import PruningError
        from .pipeline import RecipeError
        from .checkpoint.verify import CheckpointError

        from .data import TextSourceError, TestTextError
        from .evaluate import EvalError

        known = (PruningError, RecipeError, CheckpointError, FileExistsError, FileNotFoundError, TestTextError,
                 EvalError, UsageError, TextSourceError)  # fmt: skip
        try:
            from pydantic import ValidationError

            known = known + (ValidationError,)
        except ImportError:
            pass
        if isinstance(e, known):
            print(f"error: {_one_line(e)}", file=sys.stderr)
            return 2
        raise


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
    if args.cmd == "verify":
        from .checkpoint.verify import verify_checkpoint

        rep = verify_checkpoint(args.dir, args.structure, require_record=args.require_record)
        recorded = [l for l in rep.layers if l.recorded]
        if args.json:
            print(json.dumps({"ok": rep.ok, "recorded_layers": len(recorded), "errors": rep.errors,
                              "layers": [l.__dict__ for l in rep.layers]}, default=str))  # fmt: skip
        else:
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
    if args.cmd == "eval":
        import torch

        from .data import read_text
        from .evaluate import load_model, perplexity
        from .pipeline import resolve_model

        if args.seqlen < 2:
            raise UsageError(f"--seqlen must be at least 2 (one prediction needs two tokens), got {args.seqlen}")
        model, tok = load_model(resolve_model(args.model), dtype=getattr(torch, args.dtype), device=args.device)
        ppl = perplexity(model, tok, read_text(args.text, args.split), args.seqlen, args.max_segments)
        if args.json:
            print(json.dumps({"model": args.model, "perplexity": ppl, "seqlen": args.seqlen, "max_segments": args.max_segments}))
        else:
            print(f"perplexity {ppl:.4f} ({args.model}, seqlen {args.seqlen})")
        return 0
    if args.cmd == "prune":
        from .pipeline import prune

        res = prune(args.model, args.recipe, args.calib, args.out, args.num_samples, args.seqlen, args.seed, args.overwrite)
        print(f"saved {res['out']} ({res['seconds']:.1f}s); run `crepe verify {res['out']}`")
        return 0
    if args.cmd == "serve-check":
        from .vllm.check import run as serve_check

        return serve_check(args)
    if args.cmd == "search":
        from .pho.api import search
        from .pho.config import SearchConfig, SearchSpace

        if args.layers != "all" and (not args.layers.isdigit() or int(args.layers) < 1):
            raise UsageError(f"--layers must be a positive integer or 'all', got {args.layers!r}")
        if args.bounds:
            try:
                bounds = json.loads(args.bounds)
            except json.JSONDecodeError as e:
                raise UsageError(f"--bounds is not valid JSON ({e.msg} at character {e.pos}): {args.bounds!r}") from None
            if not isinstance(bounds, dict):
                raise UsageError(f"--bounds must be a JSON object of parameter ranges, got {args.bounds!r}")
        cfg = SearchConfig(
            proxy=args.proxy,
            trials=args.trials,
            sampler=args.sampler,
            storage=args.storage,
            study_name=args.study,
            seed=args.seed,
            layers="all" if args.layers == "all" else int(args.layers),
            bounds=SearchSpace(**bounds) if args.bounds else SearchSpace(),
        )
        res = search(args.model, args.calib, args.structure, args.sparsity, cfg, args.out, args.num_samples, args.seqlen,
                     args.seed, scope=args.scope, ignore=tuple(args.ignore))  # fmt: skip
        print(json.dumps({k: res[k] for k in ("proxy", "value", "params", "trials", "trial_seconds", "study_name")}))
        print(f"wrote {args.out}/best_{args.proxy}.json, {args.out}/recipe_{args.proxy}.yaml and {args.out}/report.md")
        return 0
    if args.cmd == "search-validate":
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
    if args.cmd == "demo":
        from .demo import demo

        demo(args.out, args.data_dir, args.num_samples, args.seqlen, args.eval_seqlen, args.max_segments, quick=args.quick)
        return 0
    raise AssertionError(args.cmd)


if __name__ == "__main__":
    sys.exit(main())
