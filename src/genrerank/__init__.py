"""genrerank: generative re-ranking for recommender systems."""

__version__ = "0.1.0"
