"""The psutil-based helpers the Mooncake master's start-up relies on, without Mooncake.

`_owns_listener` is what tells a master that bound its port from one that lost the bind race
to a squatter (whose port a plain TCP probe would happily reach).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from scenarios.nemesis.mooncake_master import _owns_listener, master_pids


def test_owns_listener_sees_only_this_processs_own_listening_port() -> None:
    with socket.socket() as mine, socket.socket() as idle:
        mine.bind(("127.0.0.1", 0))
        mine.listen()
        idle.bind(("127.0.0.1", 0))  # bound, never listening
        me = os.getpid()
        assert _owns_listener(me, mine.getsockname()[1]) is True
        assert _owns_listener(me, idle.getsockname()[1]) is False
        # a child listening on its own port: the child owns it, we do not
        child = subprocess.Popen(
            [sys.executable, "-c", "import socket,sys,time; s=socket.socket(); "
             "s.bind(('127.0.0.1',0)); s.listen(); print(s.getsockname()[1], flush=True); "
             "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            port = int(child.stdout.readline())
            assert _owns_listener(child.pid, port) is True
            assert _owns_listener(me, port) is False
        finally:
            child.kill()
            child.wait()
        assert _owns_listener(child.pid, port) is False  # gone


def test_master_pids_ignores_other_processes() -> None:
    assert os.getpid() not in master_pids()
    assert master_pids(rpc_port=1) == []  # nothing serves Mooncake on port 1
