"""Decoding, shared by extraction and fine-tuning: decoders, the decode pool, per-frame resize, test videos."""
