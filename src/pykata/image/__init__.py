"""Guest image: Debian cloud kernel + initrd with Python, crun and the agent."""

from pykata.image.builder import ImageArtifacts, build_image, find_image

__all__ = ["ImageArtifacts", "build_image", "find_image"]
