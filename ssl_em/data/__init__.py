"""EM volume I/O, the curated archive, the tile stream and EM augmentations."""
