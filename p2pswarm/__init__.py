"""p2pswarm: a peer-to-peer reinforcement-learning swarm for language models (GRPO + SAPO)."""

import os as _os

# Peers share machines with other peers, a UI and the user's own work. OpenMP's default spin-waiting
# then turns CPU oversubscription into 10-50x slower rounds (measured: 6-29 s vs 0.6-1.3 s a round of the
# embedded policy under load). Must be set before torch loads; a value the user exported wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# The fork's analysis functions, imported on first use so that `import p2pswarm` stays light (no pandas).
_LAZY = {"get_experiment_status": "p2pswarm.analysis", "get_experiment_metrics": "p2pswarm.analysis"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'p2pswarm' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
