"""tracegen sandbox worker: runs tool commands inside the container, one JSON line at a time.

The host starts this once per container over a single attached ``docker exec`` stream and keeps
it for the container's life, so a tool call costs one fork here instead of a new ``docker exec``
(tens of milliseconds) or a new container (hundreds).

Two users. The worker (and the container's PID 1) run as root with exactly three capabilities
(SETUID, SETGID, KILL); every command runs as the sandbox user (``--uid``/``--gid``, default
1000), with no capabilities and no supplementary groups. So no tool process can open the worker's
streams (``/proc/<pid>/fd``), trace it, signal it, or write to PID 1's output: what the host reads
on this stream is written by this program alone.

Protocol (one JSON object per line; requests on stdin, replies on stdout; stderr is diagnostics).
Every request carries an ``id`` and a ``nonce`` that its reply echoes; the host treats anything
else as a protocol error.

    host -> {"op": "hello", ...}                    worker -> {"op": "hello", "version": 2, "pid": N, ...}
    host -> {"op": "ping", ...}                     worker -> {"op": "pong", ...}
    host -> {"op": "run", "argv": [...], "script": TEXT | null, "python": bool,
             "timeout_s": T, "keep_bytes": K, "kill_bytes": B, "cwd": DIR, "env": {...} | null, ...}
    worker -> {"op": "result", "exit_code": int | null, "signal": int | null,
               "timed_out": bool, "output_capped": bool, "stdout": str, "stderr": str,
               "stdout_bytes": int, "stderr_bytes": int, "truncated": bool, "duration_s": float,
               "oom_kills": int | null, "error": str | null, ...}
    host -> {"op": "reset", "mounts": {PATH: MODE, ...}, ...}
    worker -> {"op": "reset", "ok": bool, "problems": [str], "duration_s": float, ...}

``script`` is the program text. Every call runs in a *spare*: a child this worker forks once it has
been idle for a moment after its previous reply (so the fork, the drop to the sandbox user and the
interpreter's after-fork work cost no call's time; a call that comes first forks its own), which
waits, as the sandbox user, for one call's job on a pipe of its own. With ``python`` true the script
runs in that warm interpreter (several times faster than ``python3 -c``; ``bench/sandbox.py``
measures it); otherwise the spare execs ``argv`` with the script as one more argument (``bash -c
SCRIPT``), or, when too long for one argument, as the path of an in-memory file (``bash /dev/fd/N``).
While it waits the spare also compiles a fixed program and sets the last call's environment, so a
call's own compile does not pay for the copy-on-write of the compiler's pages. A spare runs no code
of a call or a trajectory before its own call: it is forked from the worker after the previous
call's processes were killed, it is the only process of the sandbox user while no call runs, and a
``reset`` keeps it (it runs nothing while the mounts are emptied) for the next trajectory's first
call. Not ``subprocess``: it imports ``threading``, whose fork handlers make every fork of this
worker dearer.

Per call: the command runs in its own session with stdin from /dev/null. At the deadline, or when
it has written more than ``kill_bytes``, every process of the sandbox user is SIGKILLed; when the
call ends for any reason, so is anything it left behind, before the next request is read: files
persist across calls, processes do not. A python call ends when it has closed its output and
reported ``exit N`` on its report pipe: the reply goes out then, while its process is still exiting
(the call's code could write that report itself, which gains it nothing over ``os._exit``). Of each
stream at most ``keep_bytes`` are kept, half from the head and half from the tail.

``reset`` makes a used container equal, for the next trajectory, to a fresh one in everything the
sandbox user could change: it kills every process of that user (but the waiting spare), empties each
writable mount (and restores its mode), removes the user's System V IPC objects, then verifies all
of it and reports what it found instead of handing out a container it could not clean.

Standard library only; any image with python3 (>= 3.9) and bash can host it.
"""

import atexit
import contextlib
import ctypes
import gc
import io
import json
import math
import os
import select
import signal
import stat
import sys
import time
import traceback

VERSION = 2
READ_CHUNK = 1 << 16
DRAIN_AFTER_EXIT_S = 1.0  # bounded: survivors are killed first, so the pipes close almost at once
SPARE_AFTER_S = 0.1  # idle time before the next call's spare is forked (see Worker.serve)
ARGV_SCRIPT_LIMIT = 64 * 1024  # longer scripts go through a memfd (the kernel caps one argv string)
PR_SET_DUMPABLE = 4
IPC_RMID = 0
SYSV_IPC = (("shm", "shmctl"), ("msg", "msgctl"), ("sem", "semctl"))
LIBC = ctypes.CDLL(None, use_errno=True)  # loaded once here, not in every forked child
PRCTL = LIBC.prctl  # resolved once here too: in each child it cost 0.35 ms


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


def oom_counter():
    """The file counting this container's kernel OOM kills (cgroup v2 or v1), None if there is none."""
    for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
        if os.access(path, os.R_OK):
            return path
    return None


def oom_kill_count(path):
    """The ``oom_kill`` count in ``path`` (see :func:`oom_counter`), None if unreadable."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            for line in f.read().splitlines():
                name, _, value = line.partition(b" ")
                if name == b"oom_kill":
                    return int(value)
    except (OSError, ValueError):
        pass
    return None


def pids_of(uid):
    """Live (non-zombie) processes whose real uid is ``uid``."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                status = f.read()
        except OSError:
            continue
        # Only two lines matter ("State:\tS (sleeping)", "Uid:\treal\teffective..."); this runs after
        # every call, so they are found directly rather than by parsing all fifty.
        state, uids = status.find(b"\nState:"), status.find(b"\nUid:")
        try:
            real_uid = int(status[uids + 5 : status.index(b"\n", uids + 5)].split()[0])
        except (ValueError, IndexError):
            continue
        if uids >= 0 and real_uid == uid and not status[state + 7 : state + 16].strip().startswith(b"Z"):
            pids.append(int(name))
    return pids


def kill_user(uid, spared=None):
    """SIGKILL every process of ``uid`` but ``spared`` until none is left; True when none is."""
    for _ in range(200):
        pids = [pid for pid in pids_of(uid) if pid != spared]
        if not pids:
            return True
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.002)  # let a fork bomb's last children appear, then kill them too
    return not [pid for pid in pids_of(uid) if pid != spared]


def sysv_ipc_of(uid):
    """(kind, id) of every System V IPC object whose owner or creator is ``uid``."""
    found = []
    for kind, _ in SYSV_IPC:
        try:
            with open(f"/proc/sysvipc/{kind}") as f:
                header = f.readline().split()
                for line in f:
                    row = dict(zip(header, line.split()))  # noqa: B905  # runs on Python 3.9
                    if str(uid) in (row.get("uid"), row.get("cuid")):
                        found.append((kind, int(row[{"shm": "shmid", "msg": "msqid", "sem": "semid"}[kind]])))
        except (OSError, KeyError, ValueError):
            continue
    return found


class SandboxUser:
    """The uid/gid commands run as, and the one-way switch to it (a forked child, never the worker)."""

    def __init__(self, uid, gid):
        self.uid = uid
        self.gid = gid

    def become(self):
        """Drop to the sandbox user for good: no groups, and (the kernel clears them when every uid
        leaves 0; :meth:`verify` checks it once per worker) no capabilities."""
        os.setgroups([])
        os.setresgid(self.gid, self.gid, self.gid)
        os.setresuid(self.uid, self.uid, self.uid)
        if os.getresuid() != (self.uid,) * 3 or os.getresgid() != (self.gid,) * 3:
            raise OSError("could not drop to the sandbox user")
        # A process that changed uid without exec is not dumpable, which would hide its own
        # /proc/self/fd from itself; the sandbox user may see its own process, as after an exec.
        PRCTL(PR_SET_DUMPABLE, 1, 0, 0, 0)
        # Make the command, not the worker, the kernel's first choice when memory runs out. (os calls,
        # not open(): every object a forked child touches costs it a copied page.)
        with contextlib.suppress(OSError):
            fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
            os.write(fd, b"1000")
            os.close(fd)

    def verify(self):
        """Why a child that became the sandbox user still holds a privilege, or None when it holds none."""
        r, w = os.pipe()

        def check():
            with open("/proc/self/status", "rb") as f:
                status = dict(line.split(b":", 1) for line in f if b":" in line)
            held = [k.decode() for k in (b"CapEff", b"CapPrm", b"CapAmb") if int(status[k].split()[0], 16)]
            if os.getgroups():
                held.append(f"groups {os.getgroups()}")
            os.write(1, ", ".join(held).encode() or b"-")  # fork_as made the pipe our stdout
            return 0

        pid = self.fork_as(check, w, w)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            told = f.read(4096).decode("utf-8", "replace")
        os.waitpid(pid, 0)
        return None if told == "-" else (told or "the check did not run")

    def fork_as(self, child, stdout_fd, stderr_fd, keep=()):
        """Fork; the child runs ``child()`` as the sandbox user in a new session and exits with its code.

        Of the worker's descriptors the child keeps only ``stdout_fd`` and ``stderr_fd`` (as 1 and 2)
        and those in ``keep``."""
        pid = os.fork()
        if pid:
            return pid
        code = 127
        try:
            gc.disable()  # a collection would touch (and so copy) every page the child shares with us
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(stdout_fd, 1)
            os.dup2(stderr_fd, 2)
            # Nothing of the worker's may reach the command: not the host stream, not a pipe end.
            low = 3
            for fd in sorted(keep):
                os.closerange(low, fd)
                low = fd + 1
            os.closerange(low, os.sysconf("SC_OPEN_MAX"))
            self.become()
            code = child()
        except BaseException:  # noqa: BLE001 - the child must exit here, whatever happened
            with contextlib.suppress(BaseException):
                traceback.print_exc()
            code = 126
        finally:
            with contextlib.suppress(BaseException):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)


def standard_streams():
    """``sys.stdin``, ``stdout`` and ``stderr`` as ``python3 -c`` has them, on descriptors 0, 1 and 2.

    Made once, in the worker, which never uses them (its own 0 and 1 are the host's stream): each
    spare, whose 0, 1 and 2 are its call's, takes them as they are (making them there cost 0.4 ms).
    """
    return (
        io.TextIOWrapper(io.FileIO(0, "r", closefd=False)),
        io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True, errors="backslashreplace"),
        io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True, errors="backslashreplace"),
    )


STANDARD_STREAMS = standard_streams()


def prepare_python():
    """What ``python3 -c`` has before it reads its script (standard streams, argv, ``__main__``):
    a spare sets it up while it waits, so a call does not pay for it."""
    sys.stdin, sys.stdout, sys.stderr = STANDARD_STREAMS
    sys.argv = ["-c"]
    sys.path[0] = ""
    main = type(sys)("__main__")
    sys.modules["__main__"] = main
    return main


# Compiled (not run) by a spare while it waits. A forked child shares the worker's memory until it
# writes to it; the parser and the compiler then write to hundreds of shared pages, and each costs a
# copy. Compiling this first moves those copies off the call's path (print(6 * 7) compiled in 1.3-1.6
# ms in a fresh spare, 0.05 ms in a warmed one). Running it too cost more than it saved.
WARM_UP = """
import math
class Point:
    def __init__(self, x, y=0.5):
        self.x, self.y = x, y
    def norm(self):
        return math.sqrt(self.x ** 2 + self.y ** 2)
points = [Point(i, y=i / 3) for i in range(16)]
total = sum(p.norm() for p in points if p.x % 2 == 0)
words = {f"w{i}": str(i) * 3 for i in range(8)}
text = " ".join(sorted(words.values())) + repr((total, b"bytes", None, 1e-9))
try:
    raise ValueError(text[:8])
except ValueError as exc:
    message = str(exc)
"""


def warm_up():
    """Compile :data:`WARM_UP` (see there for why)."""
    compile(WARM_UP, "<warm-up>", "exec")


def set_environ(env):
    if os.environ != env:
        os.environ.clear()
        os.environ.update(env)


def run_python(script, env, cwd, main):
    """Body of a warm-interpreter child (after :func:`prepare_python`): behave like ``python3 -c SCRIPT``
    and return the exit code."""
    set_environ(env)
    os.chdir(cwd)
    try:
        exec(compile(script, "<string>", "exec"), main.__dict__)
    except SystemExit as exc:
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code & 0xFF
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException as exc:  # noqa: BLE001 - print it as the interpreter would
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None  # skip this frame
        traceback.print_exception(type(exc), exc, tb)
        return 1
    finally:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()  # as the interpreter would at exit
            sys.stdout.flush()
    return 0


def empty_tree(path):
    """Remove everything under ``path`` (not ``path``), mending permissions the owner can mend."""
    for name in os.listdir(path):
        full = os.path.join(path, name)
        st = os.lstat(full)
        if stat.S_ISDIR(st.st_mode):
            with contextlib.suppress(OSError):
                os.chmod(full, 0o700)
            empty_tree(full)
            os.rmdir(full)
        else:
            os.unlink(full)


def clean_as_sandbox_user(mounts):
    """Body of the reset's child: empty and re-mode each mount, remove the user's SysV IPC objects."""
    problems = []
    for path, mode in mounts.items():
        try:
            if os.lstat(path).st_uid == os.getuid():
                os.chmod(path, mode)
                for attr in os.listxattr(path):
                    with contextlib.suppress(OSError):
                        os.removexattr(path, attr)
            empty_tree(path)
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror or exc}")
    for kind, ident in sysv_ipc_of(os.getuid()):
        ctl = getattr(LIBC, dict(SYSV_IPC)[kind])
        args = (ident, 0, IPC_RMID, None) if kind == "sem" else (ident, IPC_RMID, None)
        if ctl(*args) != 0:
            problems.append(f"could not remove SysV {kind} {ident}")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    return 0


class Spare:
    """The worker's end of a waiting spare: its pid and the pipes to and from it."""

    def __init__(self, pid, control, report, out, err):
        self.pid, self.control, self.report, self.out, self.err = pid, control, report, out, err

    def close(self):
        for name in ("control", "report", "out", "err"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def spare_main(control_r, report_w, ahead, env_ahead):
    """Body of a spare (already the sandbox user): wait for one call's job, then become that call.

    A ``python`` job runs in this warm interpreter, then reports ``exit N`` on ``report_w``; any other
    execs its ``argv`` (the script as one more argument, or, when too long for one, as the path of an
    in-memory file: ``bash /dev/fd/N``), and why an exec failed goes to the worker on ``report_w``
    (close-on-exec: end of file there means the exec succeeded).
    """
    main = prepare_python()  # also for a job that turns out to exec: it costs that job nothing
    if ahead:  # forked ahead of its call, not by it: there is time to spare
        warm_up()
        if env_ahead is not None:
            set_environ(env_ahead)  # the last call's environment, most likely the next one's too
    with os.fdopen(control_r, "rb") as f:
        job = json.loads(f.read())
    script, env, cwd = job["script"], job["env"], job["cwd"]
    if job["python"]:
        code = run_python(script, env, cwd, main)
        # The exit status on the report pipe, then the output closed: the worker can answer the host
        # now, while this process's exit (tearing down a forked interpreter: ~0.7 ms here) runs. The
        # report goes first, so the worker, which ends a call early only once both streams are at end
        # of file, has read it by then, after any the call's code wrote (two reports: no early end).
        # The code could write one report alone, which gains it no more than os._exit would.
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        with contextlib.suppress(OSError):
            os.write(report_w, b"exit %d\n" % code)
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                os.close(fd)
        os.sched_yield()  # on a shared CPU the waking worker answers first; this process's exit waits
        return code
    argv = job["argv"]
    # Python ignores these; a command starts with the defaults, as from a shell (`yes | head` ends).
    for name in ("SIGPIPE", "SIGXFSZ"):
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    try:
        os.chdir(cwd)
        if script is not None and len(script.encode()) <= ARGV_SCRIPT_LIMIT:
            argv.append(script)  # e.g. bash -c SCRIPT
        elif script is not None:
            memfd = os.memfd_create("tracegen-script", 0)  # inherited by the exec: nothing on disk to race for
            write_all(memfd, script.encode())
            os.lseek(memfd, 0, os.SEEK_SET)
            argv = [*job["file_argv"], f"/dev/fd/{memfd}"]
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        os.write(report_w, (exc.strerror or str(exc)).encode())
        return 127 if isinstance(exc, FileNotFoundError) else 126
    except (ValueError, UnicodeError) as exc:  # e.g. a NUL in an argument
        os.write(report_w, str(exc).encode())
        return 126


class Worker:
    def __init__(self, out, user):
        self.out = out
        self.user = user
        self.oom_counter = oom_counter()
        self.oom_seen = oom_kill_count(self.oom_counter)
        """The OOM-kill count when the last request ended: the next call's baseline, read off its path."""
        self.spare = None
        self.last_env = None
        """The environment of the last call: a spare sets it while it waits."""
        self.after_reply = None
        """Work left from the last request (see :meth:`pump`), done once its reply is sent."""

    def send(self, obj, req):
        obj["id"] = req.get("id")
        obj["nonce"] = req.get("nonce")
        self.out.write(json.dumps(obj).encode() + b"\n")
        self.out.flush()

    def fork_spare(self, ahead=True):
        """Start the process the next call will run in (the *spare* above): ahead of that call, or,
        with ``ahead`` false, for a call that found none (which then skips the warm-up)."""
        control_r, control_w = os.pipe()
        report_r, report_w = os.pipe()  # close-on-exec: end of file on it means the exec succeeded
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            pid = self.user.fork_as(
                lambda: spare_main(control_r, report_w, ahead, self.last_env),
                out_w,
                err_w,
                (control_r, report_w),
            )
        except OSError:
            for fd in (control_r, control_w, report_r, report_w, out_r, out_w, err_r, err_w):
                os.close(fd)
            raise
        for fd in (control_r, report_w, out_w, err_w):
            os.close(fd)
        os.set_blocking(report_r, False)
        self.spare = Spare(pid, control_w, report_r, out_r, err_r)

    def run(self, req):
        started = time.monotonic()
        keep = int(req.get("keep_bytes", 65536))
        kill_bytes = int(req.get("kill_bytes", 64 << 20))
        timeout = float(req.get("timeout_s", 60.0))
        captures = {"stdout": Capture(keep), "stderr": Capture(keep)}
        result = {"op": "result", "exit_code": None, "signal": None, "timed_out": False, "output_capped": False}
        result["error"] = None
        oom_before = self.oom_seen
        job = {
            "argv": [str(a) for a in req["argv"]],
            "file_argv": [str(a) for a in req.get("file_argv") or req["argv"]],
            "script": req.get("script"),
            "python": bool(req.get("python")) and req.get("script") is not None,
            "env": req.get("env") or dict(os.environ),
            "cwd": req.get("cwd") or "/",
        }
        self.last_env = job["env"]
        try:
            message = json.dumps(job).encode()
            if self.spare is None:  # none was started ahead (no idle moment, or the fork failed): start one now
                self.fork_spare(ahead=False)
        except (OSError, ValueError) as exc:
            result["error"] = f"could not start {job['argv'][0]}: {getattr(exc, 'strerror', None) or exc}"
            result["exit_code"] = 126
            return self.finish(result, captures, started, oom_before)
        spare, self.spare = self.spare, None
        try:
            with contextlib.suppress(BrokenPipeError):  # a spare that died waiting: the pump reads how it ended
                write_all(spare.control, message)
            os.close(spare.control)
            out, err, spare.control, spare.out, spare.err = spare.out, spare.err, None, None, None
            report = spare.report if job["python"] else None  # python: its exit report; else: why exec failed
            self.pump(spare.pid, out, err, report, captures, started + timeout, kill_bytes, result)  # closes out, err
            with contextlib.suppress(BlockingIOError):
                told = os.read(spare.report, 4096) if report is None else b""
                if told:
                    result["error"] = f"could not start {job['argv'][0]}: {told.decode('utf-8', 'replace')}"
        finally:
            spare.close()
        return self.finish(result, captures, started, oom_before)

    def pump(self, pid, out_r, err_r, report_r, captures, deadline, kill_bytes, result):
        """Collect the call's output until it ends; kill whatever it left. A python call that closed its
        output and reported ``exit N`` on ``report_r`` ends there: reaping it and killing what it left
        wait in :attr:`after_reply`, which runs before the next request is read."""
        poller = select.poll()
        streams = {out_r: "stdout", err_r: "stderr"}
        for fd in streams:
            poller.register(fd, select.POLLIN)
        open_streams = [2]
        report = bytearray()
        reported = []  # the status a well-formed report gave
        if report_r is not None:
            poller.register(report_r, select.POLLIN)
        # A pidfd turns "the process exited" into one more readable fd, so one poll waits for
        # output and exit alike; without one (old kernels) we poll every 10 ms.
        pidfd = None
        try:
            pidfd = os.pidfd_open(pid)
            poller.register(pidfd, select.POLLIN)
        except (AttributeError, OSError):
            pass

        def read_ready(wait):
            for fd, _ in poller.poll(math.ceil(wait * 1000)):
                if fd == pidfd:
                    poller.unregister(fd)
                    continue
                if fd == report_r:
                    # Exactly one "exit N" line, or no early end at all: then the exit status decides.
                    data = os.read(fd, 64)
                    if not data:  # the process (and any child holding the pipe) is gone
                        poller.unregister(fd)
                        continue
                    report.extend(data)
                    reported.clear()
                    parts = report.split()
                    if len(report) <= 16 and report.endswith(b"\n") and len(parts) == 2 and parts[0] == b"exit":
                        with contextlib.suppress(ValueError):
                            reported.append(int(parts[1]) & 0xFF)
                    if len(report) > 16:
                        poller.unregister(fd)
                    continue
                data = os.read(fd, READ_CHUNK)
                if not data:
                    poller.unregister(fd)
                    open_streams[0] -= 1
                elif not result["output_capped"]:  # once capped, what is still in flight is dropped
                    captures[streams[fd]].add(data)
                    if captures["stdout"].total + captures["stderr"].total > kill_bytes:
                        result["output_capped"] = True

        status, reaped = 0, False
        # Until the main process exits, the deadline passes or the output cap is hit. End of output
        # is not the end of the call: programs close stdout before they exit (and children may
        # keep it open after).
        while not result["output_capped"]:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                reaped = True
                break
            if reported and not open_streams[0]:
                with contextlib.suppress(BlockingIOError):  # nothing may follow the report: no second one
                    if os.read(report_r, 1):
                        reported.clear()
                        poller.unregister(report_r)
                        continue
                result["exit_code"] = reported[0]
                for fd in (out_r, err_r):
                    os.close(fd)
                self.after_reply = lambda: self.reap(pid, pidfd)
                return
            left = deadline - time.monotonic()
            if left <= 0:
                result["timed_out"] = True
                break
            read_ready(left if pidfd is not None else min(0.01, left))
        # Nothing a call started may outlive it; with every writer dead the pipes drain at once.
        kill_user(self.user.uid)
        drain_until = time.monotonic() + DRAIN_AFTER_EXIT_S
        while open_streams[0] and time.monotonic() < drain_until:
            read_ready(0.05)
        for fd in (out_r, err_r, pidfd):
            if fd is not None:
                os.close(fd)
        if not reaped:
            _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            # Shell convention, so a model reads the familiar 137 for a SIGKILL.
            result["signal"] = os.WTERMSIG(status)
            result["exit_code"] = 128 + result["signal"]
        else:
            result["exit_code"] = os.WEXITSTATUS(status)

    def reap(self, pid, pidfd):
        """After an early end (see :meth:`pump`): let the call's process finish exiting, then kill
        whatever of the sandbox user is left, and reap it."""
        if pidfd is not None:
            exited = select.poll()
            exited.register(pidfd, select.POLLIN)
            exited.poll(50)  # its exit: usually under a millisecond
            os.close(pidfd)
        kill_user(self.user.uid)
        os.waitpid(pid, 0)
        self.oom_seen = oom_kill_count(self.oom_counter)

    def finish(self, result, captures, started, oom_before):
        oom_after = self.oom_seen = oom_kill_count(self.oom_counter)
        result["oom_kills"] = None if oom_before is None or oom_after is None else oom_after - oom_before
        for name, cap in captures.items():
            result[name] = cap.text()
            result[name + "_bytes"] = cap.total
        result["truncated"] = result["output_capped"] or any(c.truncated for c in captures.values())
        result["duration_s"] = time.monotonic() - started
        return result

    def reset(self, req):
        """Kill, empty, remove, then verify; ``ok`` only when every check holds."""
        started = time.monotonic()
        mounts = {str(path): int(mode) for path, mode in (req.get("mounts") or {}).items()}
        problems = []
        # A waiting spare is kept for the next trajectory's first call: it was forked after the last
        # call's processes were gone and has run nothing since (one fork less per trajectory).
        if self.spare is not None and os.waitpid(self.spare.pid, os.WNOHANG)[0]:
            self.spare.close()  # it died waiting (reaped just now): the next call forks its own
            self.spare = None
        spared = self.spare.pid if self.spare is not None else None
        if not kill_user(self.user.uid, spared):
            problems.append(f"processes of uid {self.user.uid} survived SIGKILL")
        err_r, err_w = os.pipe()
        pid = self.user.fork_as(lambda: clean_as_sandbox_user(mounts), err_w, err_w)
        os.close(err_w)
        with os.fdopen(err_r, "rb") as f:
            told = f.read(8192).decode("utf-8", "replace").strip()
        _, status = os.waitpid(pid, 0)
        if status != 0:
            problems.append(f"cleaning failed: {told or status}")
        # Verification, by the worker itself (the mounts are readable again at their restored mode).
        if [pid for pid in pids_of(self.user.uid) if pid != spared]:
            problems.append(f"a process of uid {self.user.uid} is still running")
        for path, mode in mounts.items():
            try:
                st = os.lstat(path)
                left = os.listdir(path)
            except OSError as exc:
                problems.append(f"{path}: cannot verify ({exc.strerror or exc})")
                continue
            if left:
                problems.append(f"{path} is not empty: {sorted(left)[:5]}")
            if st.st_uid == self.user.uid and stat.S_IMODE(st.st_mode) != mode:
                problems.append(f"{path} has mode {stat.S_IMODE(st.st_mode):o}, not {mode:o}")
        if sysv_ipc_of(self.user.uid):
            problems.append(f"System V IPC objects of uid {self.user.uid} remain")
        self.oom_seen = oom_kill_count(self.oom_counter)
        return {"op": "reset", "ok": not problems, "problems": problems, "duration_s": time.monotonic() - started}

    def handle(self, req):
        op = req.get("op")
        if op == "hello":
            return {"op": "hello", "version": VERSION, "pid": os.getpid(), "uid": os.getuid(), "user": self.user.uid}
        if op == "ping":
            return {"op": "pong"}
        if op == "run":
            return self.run(req)
        if op == "reset":
            return self.reset(req)
        return {"op": "error", "error": f"unknown op {op!r}"}

    def serve(self, inp):
        for line in iter(inp.readline, b""):
            try:
                req = json.loads(line)
                if not isinstance(req, dict):
                    raise ValueError("not an object")
            except ValueError:
                self.send({"op": "error", "error": "bad request line"}, {})
                continue
            try:
                reply = self.handle(req)
            except Exception as exc:  # noqa: BLE001 - one bad request must not end the worker
                reply = {"op": "error", "error": f"{type(exc).__name__}: {exc}"}
            self.send(reply, req)
            after, self.after_reply = self.after_reply, None
            if after is not None:
                with contextlib.suppress(OSError):
                    after()
            # The next call's process starts once this container has been idle for SPARE_AFTER_S: not
            # amid a burst of lock-step calls in other containers (it would compete with them), never
            # while a call or a reset checks the sandbox user's processes. A request sooner (the reset
            # that ends a trajectory, a quick next call) finds no spare and forks one itself.
            if self.spare is None and not select.select([inp], [], [], SPARE_AFTER_S)[0]:
                with contextlib.suppress(OSError):
                    self.fork_spare()


def main():
    uid = gid = 1000
    args = sys.argv[1:]
    while args:
        flag, value, args = args[0], int(args[1]), args[2:]
        if flag == "--uid":
            uid = value
        elif flag == "--gid":
            gid = value
    if uid == 0:
        sys.exit("the sandbox user must not be root")
    user = SandboxUser(uid, gid)
    held = user.verify()
    if held is not None:
        sys.exit(f"refusing to run commands: as the sandbox user they would still hold {held}")
    worker = Worker(sys.stdout.buffer, user)
    gc.freeze()  # what exists now is never collected, so forked children share it without copying
    # A host that goes away closes our stdin, which ends ``serve`` and so the worker.
    worker.serve(sys.stdin.buffer)


if __name__ == "__main__":
    main()
