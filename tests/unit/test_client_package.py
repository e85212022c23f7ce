"""The public client API is importable from ``clusterd.client``."""

import subprocess
import sys

import clusterd.client as client
from clusterd.client.api import Client
from clusterd.client.blocking import BlockingClient
from clusterd.client.verbs import ClientVerbs


def test_every_public_name_resolves():
    """Every name in ``clusterd.client.__all__`` can be imported from the package."""
    for name in client.__all__:
        assert getattr(client, name) is not None, name
    assert client.connect.__module__ == "clusterd.client.api"


def test_both_clients_share_one_table_of_verbs():
    """The Deferred and the blocking client get every call from the same ClientVerbs."""
    verbs = [n for n in vars(ClientVerbs) if not n.startswith("_")]
    assert len(verbs) >= 13
    for name in verbs:
        assert getattr(Client, name) is getattr(ClientVerbs, name)
        assert getattr(BlockingClient, name) is getattr(ClientVerbs, name)


def test_blocking_client_does_not_load_twisted():
    """Importing the blocking client from the package leaves Twisted unloaded (scripts start
    fast)."""
    code = "import sys, clusterd.client; print(any(m.startswith('twisted') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_reply_states_match_the_job_states():
    """The final-line formatter's state names are the scheduler's own job states."""
    from clusterd.core import replies
    from clusterd.core.jobs import JobState

    assert replies.JobState is JobState
