"""Input side: preprocessing ops, tokenizer, data sources and the tf.data pipeline."""
