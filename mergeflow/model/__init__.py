"""What a checkpoint and an adapter say: headers, layout, model map, quantization facts,
vocabulary, tokenizer, the base's config."""
