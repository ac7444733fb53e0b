"""pytest setup: markers, deterministic seeds, few threads (CI has 2 cores)."""
import os
import sys

import pytest
import torch

# Kernel tests run through Triton's interpreter on machines without CUDA; it must be chosen
# before triton is first imported, whichever test file comes first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: uses the real demo model or runs for long")
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped without it)")
    # Hugging Face's `kernels` package (transformers >= 5.25 requires it) has this repository's
    # kernels/ import name: transformers then imports ours and every comparison with it fails
    from importlib.metadata import PackageNotFoundError, version
    try:
        config.issue_config_time_warning(pytest.PytestWarning(
            f"PyPI's `kernels` {version('kernels')} is installed: its import name is this repo's "
            "kernels/ and transformers fails to import; pip install 'transformers<5.25' && pip "
            "uninstall kernels"), stacklevel=2)
    except PackageNotFoundError:
        pass


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes on a shared 2-core machine: one intra-op thread is ~10x faster under load.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="module")
def _restore_cache_env():
    """Module fixtures point WHETSTONE_CACHE at their tmp dirs: put it back after the module, so
    later modules find the demo model in the real cache (one skipped instead of running)."""
    old = os.environ.get("WHETSTONE_CACHE")
    yield
    if old is None:
        os.environ.pop("WHETSTONE_CACHE", None)
    else:
        os.environ["WHETSTONE_CACHE"] = old
