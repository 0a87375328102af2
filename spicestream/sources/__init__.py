"""Frame sources that feed a display (demo scene, ...)."""
