import sys

from netplugin.cli import main

sys.exit(main())
