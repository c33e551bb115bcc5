"""pykata-monitor: one per node, in the manner of kata-monitor. It finds the
running sandboxes under pykata's state directory, scrapes each shim's metrics
socket on demand, labels every sample with its sandbox and pod, and serves the
result to Prometheus (``/metrics``), beside ``/sandboxes`` and each sandbox's
console log. README.md, "Observing pods", says how to use it."""
