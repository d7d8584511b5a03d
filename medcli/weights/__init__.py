"""MedicalNet weights: the manifest of known releases and a resumable, verified downloader.

- ``manifest``: names, depths, files, sizes, SHA-256 and mirrors (``manifest.json``, package data).
- ``download``: ``fetch(urls, dest, sha256=..., size=...)``: mirrors, retries, resume, atomic install.
- ``verify``: size/SHA-256 checks of local files.

No torch here: checking that a fetched file loads into a model is the caller's step
(``medcli.models.load_pretrained``).
"""
