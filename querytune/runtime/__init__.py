"""What runs a model folder: its files and version, prompt and completion formats, the output grammar,
generation and the backends."""
