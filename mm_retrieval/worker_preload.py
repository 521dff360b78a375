"""The first thing the decoding workers' fork server imports (:mod:`mm_retrieval.workers`), and
the only place this module is imported: it arms the server's parent-death signal before the
server imports torch and the rest, which takes seconds."""

from .workers import arm_fork_server

arm_fork_server()
