"""What runs on each rank: decoding, windows, batched inference, shard writing, reduction, exports."""
