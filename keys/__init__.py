"""mediaseal keys."""
