"""The Calico backend: Calico v1 etcd data model, routed veths, no bridge.
Owns no code: config.py, driver.py, host_agent.py and model/ are its rooms.

``backends.calico.config`` parses the ``[calico]`` table; importing
``backends.calico.driver`` registers ``CalicoBackend`` as ``"calico"``.
"""
