import os

import pytest
import torch

# Two cores shared by everything: one thread per test process keeps timings predictable.
torch.set_num_threads(int(os.environ.get("CLEAR_TEST_THREADS", "1")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the network


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_random_pipe():
    from clear_cli.models import load_pipeline

    return load_pipeline("tiny-random")


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process: returns (exit code, stdout, stderr)."""
    from clear_cli.cli.app import run

    def _run(*args: str):
        code = run(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return _run
