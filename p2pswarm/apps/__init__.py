"""The application layer: the `p2pswarm` command and the wiring of the library into programs.

Imports point one way: this package may import the library (the rest of `p2pswarm`) and the apps
`tui` and `bootstrap`; nothing outside it imports it, except `p2pswarm/__main__.py` (tests/test_layers.py
holds that line).
"""
