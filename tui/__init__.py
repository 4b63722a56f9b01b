"""The p2pswarm terminal UI (Textual): a join screen, then a live dashboard of the node it started.

It consumes the node's event stream and queries the running engine; it imports p2pswarm, never the
other way round. `p2pswarm` (no arguments) or `p2pswarm tui` opens it; `p2pswarm demo` starts a local
swarm and opens it on one of its agents.
"""

from tui.app import Outcome, SwarmApp

__all__ = ["Outcome", "SwarmApp"]
