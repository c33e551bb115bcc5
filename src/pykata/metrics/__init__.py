"""Per-sandbox metrics: the shim serves Prometheus text on ``<sandbox dir>/metrics.sock``.

``companion`` starts the server beside a booted sandbox; ``collector`` gathers
the figures (``procstat``: host processes and taps; ``guesttext``: the agent's
text, read as hostile; ``pykata.agent.rpcstats``: agent call timings);
``server`` speaks just enough HTTP.
"""
