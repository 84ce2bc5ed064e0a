"""mediaseal buffer."""
