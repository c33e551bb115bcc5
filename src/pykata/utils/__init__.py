"""Small host helpers shared by the layers: processes, mounts, files."""
