"""vLLM-side glue. Never imports llm-compressor."""
