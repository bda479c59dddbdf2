"""netpluginctl's ``log-level``: the running plugin's log level, changed for
every one of its processes through its state directory (``netplugin.runstate``).
"""
from __future__ import annotations

from netplugin import runstate

from backends.calico.ctl.base import CtlBase, CtlError


class LogLevelCommands(CtlBase):
    def log_level(self, level: str) -> int:
        """Every process of the plugin logs at ``level`` within a second."""
        try:
            runstate.set_log_level(self.cfg.driver_state_dir, level)
        except (ValueError, OSError) as exc:
            raise CtlError(str(exc)) from None
        self.emit(f"log level {level} for the plugin of {self.cfg.path}",
                  {"log_level": level, "state_dir": self.cfg.driver_state_dir})
        return 0

