"""Offline labeling of query logs: reading and checking the log (`log_input`), preparing it on Arrow (`log_prepare`),
the resumable labeler (`label`) and its Ray Data engine (`ray_engine`)."""
