"""The command line: the only package that imports typer or rich.

Every module here must stay torch-free at import time (``medcli --help`` stays instant); engine code is
imported inside the command functions.
"""
