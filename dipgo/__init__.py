"""dipgo: gated SuperNets, a learned pruner, and SubNets that really run faster."""
__version__ = "0.1.0"
