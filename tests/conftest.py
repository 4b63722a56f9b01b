import os

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads: spin-waiting threads stall shared cores
import torch  # noqa: E402

from helpers import Procs  # noqa: E402 - tests/ is on sys.path (pytest's rootdir conftest)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_flush_denormal(True)


@pytest.fixture(scope="session")
def policy_path() -> str:
    from p2pswarm.models import embedded_path

    return str(embedded_path())


@pytest.fixture
def fresh_policy(policy_path):
    """(model, tokenizer) of the embedded policy, loaded anew for each test that changes weights."""
    from p2pswarm import models

    return models.load(policy_path, torch.device("cpu"), torch.float32)


@pytest.fixture
def procs(tmp_path):
    """Processes of one test (tests/helpers.py: Procs), all killed with their children when it ends."""
    p = Procs(tmp_path)
    yield p
    p.kill_all()
