"""Patch-feature extractors, k-means, nearest-centroid assignment, codebook artifact, metrics."""
