import os

import pytest

os.environ.setdefault("BSHAREDRAG_OFFLINE", "1")  # tests never wait on the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_backbone():
    from bsharedrag.backbone import load_backbone

    return load_backbone("tiny-random-gemma3", compute_dtype="float32")


@pytest.fixture
def fresh(tiny_backbone):
    """A new tiny model (the same random weights every time) on the session's tokenizer, which is slow to load."""
    import torch

    from bsharedrag.backbone import Backbone, tiny_random_model

    def make() -> Backbone:
        model = tiny_random_model("gemma3", tiny_backbone.tokenizer, seed=0).eval()
        return Backbone("tiny-random-gemma3", model, tiny_backbone.tokenizer, tiny_backbone.device, torch.float32)

    return make


@pytest.fixture(scope="session")
def small_epqa():
    from bsharedrag.data import load_dataset

    return load_dataset("epqa", seed=0, max_questions=30)


@pytest.fixture(scope="session")
def small_ecomeval():
    from bsharedrag.data import load_dataset

    return load_dataset("ecomeval", seed=0, max_questions=30)


TALLY: dict[str, int] = {}


@pytest.fixture
def tally():
    """tally("bad inputs tried") counts what the reliability tests exercised; the totals close the test output."""

    def add(what: str, n: int = 1) -> None:
        TALLY[what] = TALLY.get(what, 0) + n

    return add


def pytest_terminal_summary(terminalreporter):
    if TALLY:
        terminalreporter.write_line("reliability: " + ", ".join(f"{k}: {v}" for k, v in sorted(TALLY.items())))
