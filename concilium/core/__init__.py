"""The bottom layer: small pieces every other package may use (nothing here imports the rest)."""
