"""Devices: profiles, transports (one module per kind), what each can do, and the sync, lease, thermal and peak-RSS
readings built on them."""
