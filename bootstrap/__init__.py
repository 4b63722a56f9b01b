"""The headless bootstrap peer application: the first contact of a swarm (and, with --coordinator, its round
clock). Only its command line lives here; the peer itself is the library's
`p2pswarm.comm.hivemind.bootstrap.BootstrapPeer`. It imports p2pswarm, never p2pswarm.apps."""
