"""Data for bond_jax: SentencePiece tokenizer, TFDS builders (array_record, no TensorFlow), Grain pipelines.

Modules: tokenizer (train/load/export SentencePiece BPE), formats (dialogue and summarization text
formats), chitchat (dialogue and preference builders), summarization (XSum-format records),
pipeline (shuffled, sharded, padded or packed batches with resumable iterator state).
"""
