"""kmim: offline token precomputation and sharded datasets for masked image modeling."""

__version__ = "0.1.0"
