"""The runtime that binds stages to a broker."""
