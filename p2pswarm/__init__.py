"""p2pswarm: a peer-to-peer reinforcement-learning swarm for language models (GRPO + SAPO)."""

__version__ = "0.1.0"
