"""torch's private cuSPARSELt ops (tested with torch 2.13 / 2.14). The only private torch names
the plugin uses; ``crepe_plugin.vllm.sparse`` calls them through here."""

from __future__ import annotations

import warnings

import torch

from . import UpstreamError, installed_version

__all__ = ["cslt_compress", "cslt_sparse_mm", "cslt_sparse_mm_search"]


def _op(name: str):
    fn = getattr(torch, name, None)
    if fn is None:
        raise UpstreamError(
            f"crepe-plugin needs torch.{name} (cuSPARSELt), which the installed torch {installed_version('torch')} "
            "does not provide; crepe-plugin is tested with torch 2.13 and 2.14"
        )
    return fn


cslt_compress = _op("_cslt_compress")
cslt_sparse_mm = _op("_cslt_sparse_mm")
_search = _op("_cslt_sparse_mm_search")


def cslt_sparse_mm_search(*args, **kwargs) -> int:
    with warnings.catch_warnings():  # torch 2.11+ deprecates the name; the op is the same
        warnings.simplefilter("ignore")
        return int(_search(*args, **kwargs))
