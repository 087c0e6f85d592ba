"""Three-stage RPiAE training (see the training issue)."""
