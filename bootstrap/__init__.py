"""The headless bootstrap peer: the first contact of a swarm (and, with --coordinator, its round clock)."""
