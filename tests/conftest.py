import os
import signal
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:  # llm-compressor adds its loguru sink on sys.stderr when imported: do it before pytest captures
    import llmcompressor  # noqa: F401  (``import crepe_plugin`` no longer imports it)
except ImportError:  # the serving environment
    pass


def pytest_configure(config):
    """A shell without job control starts background jobs (`nohup bash .ci/run &`) with SIGINT
    ignored, and exec keeps an ignored signal ignored: the Ctrl-C tests' children would never see
    their SIGINT. A Python handler is reset to the default on exec, so install Python's own."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CREPE_DATA_DIR", ROOT.parent / "shared" / "data"))

CALIB_TEXT = (
    "The tower is 324 metres tall, about the same height as an 81-storey building. "
    "Its base is square, measuring 125 metres on each side. During its construction, "
    "it surpassed the Washington Monument to become the tallest man-made structure. "
) * 40


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    valid = SHARED_DATA / "wikitext2" / "wiki.valid.tokens.txt"
    p = tmp_path_factory.mktemp("data") / "calib.txt"
    p.write_text(valid.read_text()[:60000] if valid.exists() else CALIB_TEXT)
    return p


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from crepe_plugin.testing import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


def calib_dataset(n=8, chars=256, text=CALIB_TEXT):
    from datasets import Dataset

    return Dataset.from_dict({"text": [text[i * chars : (i + 1) * chars] for i in range(n)]})
