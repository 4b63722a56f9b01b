import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads: spin-waiting threads stall shared cores
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
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


def make_settings(tmp_path, **kw):
    from p2pswarm.settings import load_settings

    kw.setdefault("runs_dir", tmp_path / "runs")
    kw.setdefault("eval_every", 0)
    kw.setdefault("comm", "inprocess")  # the hivemind tests start real peers themselves
    return load_settings(**kw)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "p2pswarm", *args]
