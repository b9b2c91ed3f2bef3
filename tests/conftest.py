import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import synth_checkpoints as synth  # noqa: E402


@pytest.fixture(scope="session")
def synth_family(tmp_path_factory):
    """Make (and cache for the session) a base + N fine-tunes family: synth_family(name, **kw)."""
    cache = {}

    def make(name: str = "tiny", *, n_finetunes: int = 3, dtype: str = "bfloat16", shape=None, **kw):
        key = (name, n_finetunes, dtype, shape, tuple(sorted(kw.items())))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"family-{name}")
            cache[key] = synth.make_family(root, shape or synth.ModelShape(), n_finetunes=n_finetunes, dtype=dtype, **kw)
        return cache[key]

    return make
