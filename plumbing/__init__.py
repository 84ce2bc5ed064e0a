"""The plumbing every layer stands on: durable local writes, S3 access, HTTP server glue, sd_notify.

It holds mechanisms, not mediaseal policy, and imports nothing of ours, so codec's neighbours (keys,
buffer, uploader) can use it without importing each other. One copy of each mechanism lives here.
"""
