"""Checkpoint I/O: orbax for our own runs, big_vision .npz and Hugging Face imports."""
