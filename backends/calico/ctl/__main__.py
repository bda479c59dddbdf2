"""``python -m backends.calico.ctl``: runs netpluginctl (what ./netpluginctl
starts)."""
import sys

from backends.calico.ctl.cli import main

sys.exit(main())
