"""Building blocks shared by models (feature embedding, attention)."""
