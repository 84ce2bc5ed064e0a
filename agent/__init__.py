"""mediaseal agent."""
