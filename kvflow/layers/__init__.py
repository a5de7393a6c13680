"""Building blocks that models are composed of."""
