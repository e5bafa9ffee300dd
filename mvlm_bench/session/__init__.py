"""A session on one device: connect, lease, prepare, run; the runners that drive a plan through it; llama-server there."""
