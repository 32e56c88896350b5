"""Serving parses over HTTP: the gate, the service and its miss batcher, the server, and the parse cache stores."""
