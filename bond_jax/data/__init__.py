"""Data for bond_jax: tokenizers, chat templates, TFDS builders (array_record, no TensorFlow), prompt files,
Grain pipelines.

Modules: tokenizer (train/load/export SentencePiece BPE), hf_tokenizer (Hugging Face tokenizer
directories), chat (chat templates as transformers renders them), prompt_files (JSONL / Parquet /
`datasets` prompt sources), formats (dialogue and summarization text
formats), chitchat (dialogue and preference builders), summarization (XSum-format records),
pipeline (shuffled, sharded, padded or packed batches with resumable iterator state).
"""
