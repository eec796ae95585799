"""Data: sources of documents, the LM tokenizer and the record schema of the neighbour shards."""
