"""``python -m netplugin``: the plugin launcher, as ``./plugin``.
Owns nothing: it calls netplugin.cli.main.
"""
import sys

from netplugin.cli import main

sys.exit(main())
