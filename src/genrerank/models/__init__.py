"""Re-ranking models, one file each."""
