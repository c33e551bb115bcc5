"""containerd runtime v2 shim: binary protocol (main), Task service, events, stdio."""
