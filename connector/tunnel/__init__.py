"""The tunnel: a sans-I/O multiplexing protocol (protocol.py) and its trio runner (session.py)."""
