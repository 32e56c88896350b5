"""Labeling and serving: batch labeling of query logs (local or Ray), the parse cache stores, the HTTP server and its gate."""
