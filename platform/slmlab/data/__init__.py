"""Data stage: sources → tokenizer → Ray Data tokenize + pack → parquet shards (cached)."""
