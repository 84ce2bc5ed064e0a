"""mediaseal export: the reading side.

- `export.source`: packages in a repository (`file:///dir`, `s3://bucket/prefix`) read by key:
  `open_source(url, **s3_options)` (the uploader's repositories opened for reading), `split_url(url)`.
- `export.playback`: `RemotePackage`, range decryption over a source fetching only the needed chunks.
- `export.serve`: the playback HTTP server (`mediaseal serve`).

Nothing here is imported by `agent` run paths; submodules import aioboto3/aiohttp only when used.
"""
