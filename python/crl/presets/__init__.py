"""Ready training configurations shipped with the package (the demo's among them)."""
