"""The Docker runtime (this package): every tool call runs for real, in a hardened container of its own trajectory.

How a call runs. A warm pool keeps containers started ahead of need (first process ``sleep <ttl>``
under ``init``, auto-removed when it exits), each with the sandbox worker (``sandbox/worker.py``)
already attached over one ``docker exec`` stream that speaks JSON lines. A trajectory takes a
container on its first tool call and keeps it until it ends, so files written by one call are
there for the next. A call is one JSON line each way: a few milliseconds, against tens for a
``docker exec`` and hundreds for a ``docker run``. Each call runs in a *spare* process that the
worker forked from itself ahead of the call (once idle after its previous reply) and that already
switched to the sandbox user: a ``python`` call runs in that warm interpreter instead of starting
``python3`` (and is answered once it has closed its output and reported its exit status, while its
process exits), any other execs its command.

Two users. The worker and PID 1 run as root with only SETUID, SETGID and KILL; every command runs
as ``user`` (1000:1000), no capabilities, no supplementary groups. So tool code cannot open the
worker's streams through ``/proc``, trace it, signal it, or write to PID 1's output: what the host
reads is written by the worker alone. The host still trusts nothing it reads: each reply must echo
its request's id and a random nonce, a line must fit ``max_reply_bytes()``, and a line nobody asked
for ends the channel; any of these is a protocol error that replaces the container. Containers log
nothing on the host (log driver ``none``).

Deadlines, in three layers: the worker SIGKILLs every process of the sandbox user at
``timeout_s``; the host waits ``kill_grace_s`` more for the reply; past that it kills the container
and the trajectory's next call gets a fresh one. Output is capped twice: the worker keeps at most
``keep_bytes`` of each stream (head and tail) and kills a command that writes more than
``kill_bytes``; the model then sees at most ``max_chars`` characters, middle-truncated.

Recycling (``recycle``, on by default). When a trajectory ends, its container is reset and handed
to a later trajectory instead of being replaced, up to ``recycle_max_uses`` times. The reset kills
every process of the sandbox user, empties every mount it can write to (``tmpfs`` work dirs,
``/dev/shm``, ``/dev/mqueue``) and restores their modes, removes its System V IPC objects, then
verifies each of those (no process of the uid but the waiting spare, each mount empty at its mode,
no IPC object, the worker answering) before the container goes back to the pool. The spare is kept
for the next trajectory's first call: it was forked after the last call's processes were gone and has
run only the worker's code since. A reset that fails or is not verified in ``reset_timeout_s``
replaces the container, and so does a container whose call timed out or was OOM-killed. Against a
fresh container, a recycled one differs only in what the sandbox user cannot reset and the next
trajectory can at most observe: the pid counter and process start times, the container's uptime
and cgroup counters (CPU time, OOM-kill count, memory high-water mark), the kernel's shared state
(page cache, entropy, network namespace counters on loopback), and freed memory of the worker: it
parsed earlier calls' scripts and built their replies, and every spare is a copy of its memory, so
code that reads its own process's memory could find fragments of earlier calls (of earlier
trajectories too) that Python has freed but not overwritten. ``recycle: false`` has no such
channel: each container's worker only ever served one trajectory. The
read-only root filesystem means nothing else can carry a file from one trajectory to the next; the
``writable places`` self-check asserts that every writable path is a mount that the reset empties.
With ``recycle: false`` every trajectory gets a fresh container, as before.

What the sandbox protects against (all on by default, each configurable):

- code that loops forever, forks without end, leaves background processes, fills memory or disk,
  or prints without end: deadlines, ``pids_limit``, ``mem_limit`` (= ``memswap_limit``, so no
  swap), a CPU quota, size-limited tmpfs work dirs, ``ulimit`` on file size and open files;
- code that reaches the network: ``network_mode=none`` (loopback only);
- code that changes the image or the host: read-only root filesystem, a non-root user, every
  capability dropped, ``no-new-privileges``;
- code that forges what the host reads (a tool result, a tests verdict) or grows the host's
  memory or disk: separate uids for worker and commands, replies matched by id and nonce,
  bounded host buffers, no container log;
- the host's secrets: containers get a fixed, minimal environment, never the host's (so
  ``TRACEGEN_TEACHER_API_KEY`` is not there) and no host directory is mounted;
- trajectories seeing each other: one trajectory per container at a time, a verified reset
  between two (above);
- leaked containers: every container is labelled with its owner process and a ttl; start-up sweeps
  those whose owner is dead or whose ttl passed (never one whose owner lives, whatever its state),
  exit removes our own, and ``sleep <ttl>`` ends the container even after ``kill -9`` of the host
  process.

What it does not protect against:

- kernel or container-runtime exploits: containers share the host kernel. For hostile code from
  untrusted parties use a VM boundary (gVisor's ``runsc`` via ``docker_runtime``, Kata, Firecracker);
- anything an engine you point it at allows: a remote ``DOCKER_HOST`` is trusted like a local one;
- exhaustion of shared resources the limits do not cover (disk I/O bandwidth, the page cache,
  the engine's own throughput);
- code inside one trajectory harming that trajectory (deleting its own files, exiting early);
- a solution under ``filter --verifier tests`` that deliberately reads the test runner's state
  for its end-of-tests marker (its memory; the bash runner's variables; node's process events): the
  tests run in the solution's process by design. An early exit (``sys.exit(0)``, ``os._exit(0)``,
  ``process.exit(0)``, ``exit 0`` or an ``exit 0`` trap) fails (``tracegen.checks.task_tests.LANGUAGES``);
- processes outliving a call: every process a call started is killed when the call ends. Files
  persist across the calls of a trajectory; processes do not.
"""

# Modules: settings (the recipe section, labels, fixed environment), sweep (owners, stale containers,
# connecting), channel (the worker stream), pool (containers: start, hand out, reset, remove),
# episode (one trajectory's calls). Import from them; this file holds only the promise above.
