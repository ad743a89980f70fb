"""Corpora to cleaned, SentencePiece-tokenized Parquet shards, streamed as resumable token-budget batches."""
