"""bids stage."""
