"""mediaseal uploader."""
