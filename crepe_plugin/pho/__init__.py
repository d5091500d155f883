"""PHO: proxy-based search of CRePE's coefficients (needs optuna, cmaes; the `search` extra)."""

from .config import PROXY_NAMES, Range, OddRange, SearchConfig, SearchSpace

__all__ = ["SearchConfig", "SearchSpace", "Range", "OddRange", "PROXY_NAMES", "search", "validate"]


def search(*args, **kwargs):
    from .api import search as _search

    return _search(*args, **kwargs)


def validate(*args, **kwargs):
    from .validate import validate as _validate

    return _validate(*args, **kwargs)
