"""mediaseal export."""
