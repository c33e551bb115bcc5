"""The agent that runs inside the guest VM (see README.md beside this file)."""
