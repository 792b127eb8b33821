"""The on-disk contract: preprocessing, shards, manifest, verification (writer and reader side)."""
