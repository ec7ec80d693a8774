"""fedsynth: federated, differentially private synthetic medical images."""
__version__ = "0.1.0"
