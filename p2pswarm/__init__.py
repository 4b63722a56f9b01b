"""p2pswarm: a peer-to-peer reinforcement-learning swarm for language models (GRPO + SAPO)."""

import os as _os

# Peers share machines with other peers, a UI and the user's own work. OpenMP's default spin-waiting
# then turns CPU oversubscription into 10-50x slower rounds (measured: 6-29 s vs 0.6-1.3 s a round of the
# embedded policy under load). Must be set before torch loads; a value the user exported wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
