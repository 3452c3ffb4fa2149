"""tracegen sandbox worker: runs tool commands inside the container, one JSON line at a time.

The host starts this once per container over a single attached ``docker exec`` stream and keeps
it for the whole trajectory, so a tool call costs one fork+exec here instead of a new
``docker exec`` (tens of milliseconds) or a new container (hundreds).

Protocol (one JSON object per line; requests on stdin, replies on stdout; stderr is diagnostics):

    host -> {"op": "hello"}                         worker -> {"op": "hello", "version": 1, "pid": N}
    host -> {"op": "ping"}                          worker -> {"op": "pong"}
    host -> {"op": "run", "id": ID, "argv": [...], "script": TEXT | null, "file_argv": [...],
             "timeout_s": T, "keep_bytes": K, "kill_bytes": B, "cwd": DIR, "env": {...} | null}

``script`` is appended to ``argv`` (``python3 -c SCRIPT``); one too long for a single argument is
written to a temporary file whose path is appended to ``file_argv`` instead (``python3 FILE``).
    worker -> {"op": "result", "id": ID, "exit_code": int | null, "signal": int | null,
               "timed_out": bool, "output_capped": bool, "stdout": str, "stderr": str,
               "stdout_bytes": int, "stderr_bytes": int, "truncated": bool, "duration_s": float,
               "oom_kills": int | null, "error": str | null}

Nothing is printed before the host's ``hello``: bytes that arrive together with the HTTP upgrade
response could be swallowed by the host's HTTP parser.

Per call: the command runs in its own session (so its own process group) with stdin from
/dev/null. At the deadline, or when it has written more than ``kill_bytes``, the whole group is
SIGKILLed. When the call ends for any reason, every process it left behind is killed too (the
group, then any process that escaped it with setsid): files persist across calls, processes do
not. Of each stream at most ``keep_bytes`` are kept, half from the head and half from the tail.

Standard library only; runs on any Python >= 3.8 so any image with ``python3`` can host it.
"""

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time

VERSION = 1
READ_CHUNK = 1 << 16
DRAIN_AFTER_EXIT_S = 1.0  # bounded: survivors are killed first, so the pipes close almost at once
ARGV_SCRIPT_LIMIT = 64 * 1024  # longer scripts go through a file (the kernel caps one argv string)


class Capture:
    """Keeps the first and last ``keep // 2`` bytes of a stream and counts the rest."""

    def __init__(self, keep):
        self.head_cap = keep - keep // 2
        self.tail_cap = keep // 2
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, data):
        self.total += len(data)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data and self.tail_cap:
            self.tail += data
            if len(self.tail) > self.tail_cap:
                del self.tail[: len(self.tail) - self.tail_cap]

    @property
    def truncated(self):
        return self.total > len(self.head) + len(self.tail)

    def text(self):
        head = self.head.decode("utf-8", "backslashreplace")
        if not self.truncated:
            return head + self.tail.decode("utf-8", "backslashreplace")
        elided = self.total - len(self.head) - len(self.tail)
        marker = f"\n[... {elided} bytes elided ...]\n"
        return head + marker + self.tail.decode("utf-8", "backslashreplace")


def oom_kill_count():
    """Kernel OOM kills so far in this container's memory cgroup (v2 or v1), None if unreadable."""
    for path, key in (
        ("/sys/fs/cgroup/memory.events", "oom_kill"),
        ("/sys/fs/cgroup/memory/memory.oom_control", "oom_kill"),
    ):
        try:
            with open(path) as f:
                for line in f:
                    name, _, value = line.partition(" ")
                    if name == key:
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


def live_pids():
    """Pids of processes that are not zombies (a zombie is already dead; killing it again is moot)."""
    pids = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                state = f.read().rpartition(b")")[2].split(None, 1)[0]
        except (OSError, IndexError):
            continue
        if state != b"Z":
            pids.add(int(name))
    return pids


class Worker:
    def __init__(self, out):
        self.out = out
        # Everything alive before the first call (init, the keepalive sleep, us) is never killed.
        self.protected = live_pids() | {os.getpid(), os.getppid()}

    def send(self, obj):
        self.out.write(json.dumps(obj).encode() + b"\n")
        self.out.flush()

    def kill_leftovers(self, pgid):
        """SIGKILL the call's process group, then anything that escaped it, until none is left."""
        for _ in range(50):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            killed = 0
            for pid in live_pids() - self.protected:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except (ProcessLookupError, PermissionError):
                    pass  # gone already, or not ours (another user's exec): nothing we can do
            if not killed:
                return
            time.sleep(0.005)  # let a fork bomb's last children appear, then kill them too

    def run(self, req):
        started = time.monotonic()
        keep = int(req.get("keep_bytes", 65536))
        kill_bytes = int(req.get("kill_bytes", 64 << 20))
        timeout = float(req.get("timeout_s", 60.0))
        argv = list(req["argv"])
        script = req.get("script")
        script_path = None
        if script is not None:
            if len(script.encode()) <= ARGV_SCRIPT_LIMIT:
                argv.append(script)  # e.g. python3 -c SCRIPT: tracebacks read "<string>", not a temp path
            else:
                script_path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f".tracegen-script-{os.getpid()}")
                with open(script_path, "w") as f:
                    f.write(script)
                argv = [*list(req.get("file_argv") or argv), script_path]
        oom_before = oom_kill_count()
        captures = {"stdout": Capture(keep), "stderr": Capture(keep)}
        result = {
            "op": "result",
            "id": req.get("id"),
            "exit_code": None,
            "signal": None,
            "timed_out": False,
            "output_capped": False,
            "error": None,
        }
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=req.get("cwd") or None,
                env=req.get("env") or None,
                start_new_session=True,  # its own process group, so one killpg reaches every child
            )
        except OSError as exc:
            result["error"] = f"could not start {argv[0]}: {exc.strerror or exc}"
            result["exit_code"] = 127 if isinstance(exc, FileNotFoundError) else 126
            return self.finish(result, captures, started, oom_before, script_path)
        try:
            # Make the command, not the worker, the kernel's first choice when memory runs out.
            with open(f"/proc/{proc.pid}/oom_score_adj", "w") as f:
                f.write("1000")
        except OSError:
            pass
        self.pump(proc, captures, started + timeout, kill_bytes, result)
        return self.finish(result, captures, started, oom_before, script_path)

    def pump(self, proc, captures, deadline, kill_bytes, result):
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
        sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
        open_streams = [2]
        # A pidfd turns "the process exited" into one more readable fd, so one select waits for
        # output and exit alike; without one (Python < 3.9, old kernels) we poll every 10 ms.
        pidfd = None
        try:
            pidfd = os.pidfd_open(proc.pid)
            sel.register(pidfd, selectors.EVENT_READ, "exit")
        except (AttributeError, OSError):
            pass

        def read_ready(wait):
            for key, _ in sel.select(wait):
                if key.data == "exit":
                    sel.unregister(key.fileobj)
                    continue
                data = os.read(key.fd, READ_CHUNK)
                if not data:
                    sel.unregister(key.fileobj)
                    open_streams[0] -= 1
                elif not result["output_capped"]:  # once capped, what is still in flight is dropped
                    captures[key.data].add(data)
                    if captures["stdout"].total + captures["stderr"].total > kill_bytes:
                        result["output_capped"] = True

        # Until the main process exits, the deadline passes or the output cap is hit. End of output
        # is not the end of the call: programs close stdout before they exit (and children may
        # keep it open after).
        while proc.poll() is None and not result["output_capped"]:
            left = deadline - time.monotonic()
            if left <= 0:
                result["timed_out"] = True
                break
            read_ready(left if pidfd is not None else min(0.01, left))
        # Nothing a call started may outlive it; with every writer dead the pipes drain at once.
        self.kill_leftovers(proc.pid)
        drain_until = time.monotonic() + DRAIN_AFTER_EXIT_S
        while open_streams[0] and time.monotonic() < drain_until:
            read_ready(0.05)
        sel.close()
        if pidfd is not None:
            os.close(pidfd)
        proc.stdout.close()
        proc.stderr.close()
        code = proc.wait()
        if code < 0:
            # Shell convention, so a model reads the familiar 137 for a SIGKILL.
            result["signal"] = -code
            result["exit_code"] = 128 - code
        else:
            result["exit_code"] = code

    def finish(self, result, captures, started, oom_before, script_path):
        if script_path:
            with contextlib.suppress(OSError):
                os.unlink(script_path)
        oom_after = oom_kill_count()
        result["oom_kills"] = None if oom_before is None or oom_after is None else oom_after - oom_before
        for name, cap in captures.items():
            result[name] = cap.text()
            result[name + "_bytes"] = cap.total
        result["truncated"] = result["output_capped"] or any(c.truncated for c in captures.values())
        result["duration_s"] = time.monotonic() - started
        return result

    def serve(self, inp):
        for line in iter(inp.readline, b""):
            try:
                req = json.loads(line)
            except ValueError:
                self.send({"op": "error", "error": "bad request line"})
                continue
            op = req.get("op")
            if op == "hello":
                self.send({"op": "hello", "version": VERSION, "pid": os.getpid()})
            elif op == "ping":
                self.send({"op": "pong"})
            elif op == "run":
                self.send(self.run(req))
            else:
                self.send({"op": "error", "error": f"unknown op {op!r}"})


def main():
    # A host that goes away closes our stdin, which ends ``serve`` and so the worker.
    Worker(sys.stdout.buffer).serve(sys.stdin.buffer)


if __name__ == "__main__":
    main()
