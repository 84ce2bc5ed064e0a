"""The one thing pyproject.toml cannot say: install each top-level folder under the mediaseal root.

The repository's folders stay as the design card names them (codec/, plumbing/, keys/, buffer/, uploader/,
agent/, export/), but they install as mediaseal.codec, mediaseal.keys, ...: PyPI has packages named
agent, buffer, export and uploader, and six generic top-level names in a shared site-packages would
break whichever came first. Packages are discovered below each folder, never listed by hand (a
hand-written list once left out keys.lkm and shipped a mediaseal that could not start).
Everything else about the distribution is in pyproject.toml.
"""

from setuptools import find_packages, setup

ROOT = "mediaseal"
FOLDERS = ("codec", "plumbing", "keys", "buffer", "uploader", "agent", "export")

packages = [f"{ROOT}.{folder}{'.' + sub if sub else ''}"
            for folder in FOLDERS for sub in ("", *find_packages(folder))]
setup(packages=packages, package_dir={f"{ROOT}.{folder}": folder for folder in FOLDERS})
