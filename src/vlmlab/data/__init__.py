"""Data: LLaVA JSON conversations -> WebDataset shards -> templated, masked, collated batches."""
