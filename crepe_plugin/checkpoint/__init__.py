"""The saved checkpoint: its record (``record``: the ``crepe_sparsity`` schema in config.json,
read as pure data), its check (``verify``: per-layer N:M and density read straight from the
safetensors), and the save hook that keeps the record through llm-compressor's save (``save``).

``record`` and ``verify`` import neither llm-compressor nor vLLM (the serving side uses both);
``save`` is used by the modifiers only.
"""
