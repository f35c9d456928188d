"""The sandbox around everything an agent does in a workspace (bubblewrap).

Every command of `apollo.agents.envs.workspace` runs under `bwrap` (Debian package
`bubblewrap`), one sandbox per command, all of an episode's sandboxes sharing its
workspace directory. Inside a sandbox:

Allowed
- read and write the workspace (mounted at its own real path, also `$HOME` and the
  working directory), a private `/tmp` and `/dev/shm` (tmpfs, `max_tmp_mb` each);
- read and execute `/usr` and the `/bin`, `/sbin`, `/lib*` links or directories;
- a minimal `/etc`: a synthetic `passwd`, `group`, `hosts`, `hostname` and
  `nsswitch.conf` naming only root and the agent, plus what programs need to start
  (`ld.so.cache`, `alternatives`, `localtime`, `os-release`, `python3*`);
- a fresh `/proc` that shows only the sandbox's own processes, and a minimal `/dev`.

Refused
- every other file of the machine: no `/root`, no `/home`, no project, service or
  other workspaces' files, no host `/etc/passwd`; `/`, `/usr` and `/etc` are read-only;
- the network: a new, empty network namespace (loopback down), so not even services
  on the machine's 127.0.0.1 can be reached;
- the service's environment: the command sees only `PATH`, `HOME`, `USER`,
  `LOGNAME`, `SHELL`, `LANG`, `TERM` and `TMPDIR` with fixed values (no tokens);
- other processes: own PID, IPC, UTS and cgroup namespaces; no capabilities,
  `no_new_privs` (setuid programs do not gain anything);
- escaping cleanup: each command is PID 1's only child in its PID namespace, and when
  it exits, times out, is killed, or the service dies (`--die-with-parent`), the
  kernel kills every process left in that namespace: background jobs, `setsid`
  children, orphans.

Limits (`Limits`, set with `ulimit` inside the sandbox, hard and soft): tasks
(processes and threads) per sandbox (`RLIMIT_NPROC`), address space per process
(`RLIMIT_AS`), CPU seconds per process (`RLIMIT_CPU`), size of a written file
(`RLIMIT_FSIZE`), no core dumps. The wall-clock timeout is enforced by the workspace.

How the process limit holds as root. The kernel never applies `RLIMIT_NPROC` to a
task whose real uid is root (also not to uid 0 mapped into a user namespace), and
outside a user namespace it counts all processes of a uid, machine-wide. So:
- service running as root: `bwrap` runs privileged (no user namespace) with only
  `CAP_SETUID`/`CAP_SETGID` kept, and `setpriv` switches the command to a uid of its
  own, `sandbox_uid(root)` (a high uid, derived from the workspace path, that no
  account uses), before the limits are set; the workspace is chowned to that uid.
  The count is then exactly the sandbox's processes (plus those of the same
  episode's other sessions, which share the uid);
- service running as another user: `bwrap` creates a user namespace (uid 1000
  inside, the service's uid outside) and the limit counts the processes of that
  user namespace only.
A pids cgroup would be the other way, but it is rarely writable where the service
runs (containers, CI), so it is not used.

Where `bwrap` is missing or cannot create namespaces, `unavailable_reason()` says
why; the workspace then refuses to start unless its operator passes
`unsafe_no_sandbox=True` (`Unconfined`: plain `bash -c`, same limits and timeout,
nothing else).

File tools never run commands: they use `open_in_root`, which resolves a path one
component at a time with `O_NOFOLLOW` from a directory descriptor of the workspace,
following symbolic links only while they stay inside it, so a link swapped in at any
moment cannot redirect a read or a write outside (there is no check-then-open).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import functools
import glob
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Sequence

BWRAP = "/usr/bin/bwrap" if os.path.exists("/usr/bin/bwrap") else shutil.which("bwrap") or "bwrap"
SETPRIV = "/usr/bin/setpriv"
INNER_UID = 1000  # the agent's uid inside a user namespace (service not root)
_UID_BASE, _UID_SPAN = 1_500_000_000, 100_000_000  # root: per-workspace uids
_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
# Host files under /etc that programs need to start; everything else in /etc is hidden.
_ETC_FILES = (
  "alternatives",
  "ld.so.cache",
  "ld.so.conf",
  "ld.so.conf.d",
  "localtime",
  "os-release",
  "protocols",
  "services",
)
MAX_SYMLINKS = 40


class SandboxUnavailable(RuntimeError):
  """bubblewrap cannot confine commands here (and the operator did not opt out)."""


@dataclasses.dataclass(frozen=True)
class Limits:
  """Resource limits of every sandboxed command."""

  max_processes: int = 512  # tasks (processes + threads) of a sandbox (as root: of a workspace)
  max_memory_mb: int = 4096  # address space of one process
  max_cpu_s: int = 3600  # CPU seconds of one process
  max_file_mb: int = 1024  # largest file a command may write
  max_tmp_mb: int = 1024  # size of the private /tmp and of /dev/shm

  def prelude(self) -> str:
    """Shell that sets the limits, then runs the command given as `$1`."""
    return (
      f"ulimit -S -H -c 0 -u {self.max_processes} -v {self.max_memory_mb * 1024} "
      f"-t {self.max_cpu_s} -f {self.max_file_mb * 1024} || exit 126; "
      'exec /bin/bash -c "$1"'
    )


def sandbox_uid(root: str) -> int:
  """The uid that commands of workspace `root` run as when the service is root."""
  return _UID_BASE + zlib.crc32(os.fsencode(root)) % _UID_SPAN


# Processes are started from one long-lived thread: `--die-with-parent` (like any
# PR_SET_PDEATHSIG) fires when the *thread* that forked bwrap exits, so a command
# started from a short-lived thread would otherwise die with that thread.
_SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-spawn")


def _popen(argv: Sequence[str], **kwargs) -> subprocess.Popen:
  return _SPAWNER.submit(subprocess.Popen, list(argv), **kwargs).result()


class Process:
  """A started command: its `proc` (bwrap, or bash when unconfined) and how to stop it."""

  def __init__(self, proc: subprocess.Popen, info: dict | None = None):
    self.proc = proc
    self.init_pid: int | None = None  # PID 1 of the sandbox, as seen from here
    self.pid_ns: str | None = None  # "pid:[inode]" of the sandbox's PID namespace
    self._pidfd: int | None = None
    self._lock = threading.Lock()  # the watchdog, the agent and close() may race
    if info and "child-pid" in info:
      pid, ns = int(info["child-pid"]), f"pid:[{info.get('pid-namespace')}]"
      try:
        pidfd = os.pidfd_open(pid)
      except OSError:
        return  # the sandbox is already gone
      try:
        if os.readlink(f"/proc/{pid}/ns/pid") == ns:  # not a recycled pid
          self.init_pid, self.pid_ns, self._pidfd = pid, ns, pidfd
          return
      except OSError:
        pass
      os.close(pidfd)

  def pids(self) -> list[int]:
    """The processes inside the sandbox, its PID 1 excluded."""
    if self.pid_ns is None:
      return []
    found = []
    for name in os.listdir("/proc"):
      if name.isdigit() and int(name) != self.init_pid:
        try:
          if os.readlink(f"/proc/{name}/ns/pid") == self.pid_ns:
            found.append(int(name))
        except OSError:
          pass
    return found

  def interrupt(self, sig: int = signal.SIGINT, timeout: float = 1.0) -> None:
    """Sends `sig` to every process of the command (Ctrl-C), not to the sandbox itself.

    A command that has not started yet inside its sandbox is waited for (`timeout`)."""
    if self.pid_ns is None:
      _killpg(self.proc.pid, sig)
      return
    deadline = time.monotonic() + timeout
    while True:
      pids = self.pids()
      for pid in pids:
        try:
          os.kill(pid, sig)
        except OSError:
          pass
      if pids or self.proc.poll() is not None or time.monotonic() > deadline:
        return
      time.sleep(0.01)

  def kill(self, timeout: float = 5.0) -> None:
    """Kills every process of the command and waits until they are gone."""
    with self._lock:
      if self._pidfd is not None:
        try:  # PID 1 dying takes the whole namespace with it
          signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        except ProcessLookupError:
          pass
      elif self.pid_ns is None:
        _killpg(self.proc.pid, signal.SIGKILL)
    try:
      self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait(timeout=timeout)

  def release(self) -> None:
    """Closes the descriptor of the sandbox's PID 1 (after it ended or was killed)."""
    with self._lock:
      if self._pidfd is not None:
        os.close(self._pidfd)
        self._pidfd = None


def _killpg(pgid: int, sig: int) -> None:
  try:
    os.killpg(pgid, sig)
  except (ProcessLookupError, PermissionError):
    pass


class Unconfined:
  """No sandbox (`unsafe_no_sandbox`): `bash -c` in the workspace, with the limits."""

  name = "NONE (unsafe)"

  def __init__(self, root: str, limits: Limits):
    self.root, self.limits, self.owner = root, limits, None

  def start(self, command: str) -> Process:
    proc = _popen(
      ["/bin/bash", "-c", self.limits.prelude(), "apollo-unconfined", command],
      cwd=self.root,
      stdin=subprocess.DEVNULL,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      start_new_session=True,
    )
    return Process(proc)


class Sandbox:
  """bubblewrap around each command of one workspace (see the module docstring)."""

  name = "bubblewrap"

  def __init__(self, root: str, limits: Limits):
    self.root = os.path.realpath(root)
    self.limits = limits
    self.as_root = os.geteuid() == 0
    # uid:gid that owns the workspace so that commands can write it (None: no change).
    self.owner = (sandbox_uid(self.root),) * 2 if self.as_root else None
    self.uid = self.owner[0] if self.owner else INNER_UID

  def _etc(self) -> dict[str, str]:
    home = self.root
    return {
      "passwd": "root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n"
      f"agent:x:{self.uid}:{self.uid}:agent:{home}:/bin/bash\n"
      "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
      "group": f"root:x:0:\nagent:x:{self.uid}:\nnogroup:x:65534:\n",
      "hostname": "sandbox\n",
      "hosts": "127.0.0.1 localhost sandbox\n::1 localhost\n",
      "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
    }

  def argv(self, command: str, info_fd: int, data_fds: dict[str, int]) -> list[str]:
    """The bwrap command line (`data_fds`: /etc file name -> readable fd)."""
    env = {
      "PATH": _PATH,
      "HOME": self.root,
      "USER": "agent",
      "LOGNAME": "agent",
      "SHELL": "/bin/bash",
      "LANG": "C.UTF-8",
      "TERM": "dumb",
      "TMPDIR": "/tmp",
    }
    args = [BWRAP, "--die-with-parent", "--new-session", "--info-fd", str(info_fd)]
    args += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts"]
    args += ["--unshare-cgroup-try", "--hostname", "sandbox"]
    if self.as_root:  # privileged bwrap; setpriv below drops to the sandbox uid
      args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
      args += ["--unshare-user", "--uid", str(INNER_UID), "--gid", str(INNER_UID)]
      args += ["--disable-userns"]
    args += ["--clearenv"]
    for key, value in env.items():
      args += ["--setenv", key, value]
    args += ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
      path = "/" + name
      if os.path.islink(path):
        args += ["--symlink", os.readlink(path), path]
      elif os.path.isdir(path):
        args += ["--ro-bind", path, path]
    tmp_bytes = str(self.limits.max_tmp_mb << 20)
    args += ["--proc", "/proc", "--dev", "/dev"]
    args += ["--perms", "1777", "--size", tmp_bytes, "--tmpfs", "/dev/shm"]
    args += ["--perms", "1777", "--size", tmp_bytes, "--tmpfs", "/tmp"]
    args += ["--perms", "0755", "--tmpfs", "/etc"]
    etc_files = list(_ETC_FILES) + sorted(
      os.path.basename(p) for p in glob.glob("/etc/python3*") if os.path.isdir(p)
    )
    for name in etc_files:
      args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    for name, fd in data_fds.items():
      args += ["--perms", "0644", "--ro-bind-data", str(fd), f"/etc/{name}"]
    args += ["--remount-ro", "/etc"]
    # The workspace's parents must be traversable (bwrap copies the host's modes).
    parent, parents = os.path.dirname(self.root), []
    while parent not in ("/", ""):
      parents.append(parent)
      parent = os.path.dirname(parent)
    for path in reversed(parents):
      if path not in ("/tmp", "/usr", "/etc", "/dev", "/proc"):
        args += ["--perms", "0755", "--dir", path]
    args += ["--bind", self.root, self.root, "--chdir", self.root, "--remount-ro", "/"]
    args += ["--"]
    if self.as_root:
      uid = str(self.uid)
      args += [SETPRIV, "--reuid", uid, "--regid", uid, "--clear-groups", "--inh-caps=-all"]
    args += ["/bin/bash", "-c", self.limits.prelude(), "apollo-sandbox", command]
    return args

  def start(self, command: str, **popen_kwargs) -> Process:
    """Starts `command` in a new sandbox; output and errors go to one pipe."""
    info_r, info_w = os.pipe()
    data_fds = {}
    try:
      for name, text in self._etc().items():
        r, w = os.pipe()  # a few hundred bytes: never blocks
        os.write(w, text.encode())
        os.close(w)
        data_fds[name] = r
      kwargs = {
        "stdin": subprocess.DEVNULL,
        "stdout": subprocess.PIPE,
        "stderr": subprocess.STDOUT,
        "start_new_session": True,
        **popen_kwargs,
      }
      proc = _popen(
        self.argv(command, info_w, data_fds),
        pass_fds=[info_w, *data_fds.values()],
        env={"PATH": _PATH},
        **kwargs,
      )
    finally:
      os.close(info_w)
      for fd in data_fds.values():
        os.close(fd)
    with os.fdopen(info_r, "rb") as f:  # written once the namespaces exist, then closed
      raw = f.read()
    try:
      info = json.loads(raw) if raw else None
    except ValueError:
      info = None
    return Process(proc, info)

  def prepare(self) -> None:
    """Makes the workspace writable by the sandbox's uid (service running as root)."""
    if self.owner is not None:
      chown_tree(self.root, *self.owner)


@functools.cache
def _probe(bwrap: str, setpriv: str, euid: int) -> str | None:
  del euid  # part of the cache key: the mode depends on it
  if not os.path.isfile(bwrap):
    return f"bubblewrap is not installed ({bwrap} is missing; apt-get install bubblewrap)"
  if os.geteuid() == 0 and not os.path.exists(setpriv):
    return f"{setpriv} (util-linux) is missing; the sandbox needs it when running as root"
  with tempfile.TemporaryDirectory(prefix="apollo-sandbox-probe-") as tmp:
    box = Sandbox(tmp, Limits())
    box.prepare()
    try:
      process = box.start("echo sandbox-ok")
    except OSError as e:
      return f"bwrap could not be run: {type(e).__name__}: {e}"
    try:
      out, _ = process.proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
      process.kill()
      return "bwrap did not finish a trivial command within 20 s"
    finally:
      process.release()
  text = out.decode(errors="replace").strip()
  if process.proc.returncode != 0 or text != "sandbox-ok":
    return f"bwrap cannot create a sandbox here (exit code {process.proc.returncode}): {text}"
  return None


def unavailable_reason() -> str | None:
  """Why commands cannot be sandboxed here, or None when they can (cached)."""
  return _probe(BWRAP, SETPRIV, os.geteuid())


def make(root: str, limits: Limits, unsafe_no_sandbox: bool = False) -> Sandbox | Unconfined:
  """The sandbox of workspace `root`; raises `SandboxUnavailable` where there is none."""
  reason = unavailable_reason()
  if reason is None:
    box = Sandbox(root, limits)
    box.prepare()
    return box
  if unsafe_no_sandbox:
    return Unconfined(root, limits)
  raise SandboxUnavailable(
    f"the workspace sandbox is unavailable: {reason}. Install bubblewrap, or pass "
    "unsafe_no_sandbox=True to run the agent's commands unconfined (unsafe)."
  )


# ---------------------------------------------------------------------- file access
def chown_tree(root: str, uid: int, gid: int) -> None:
  """chown -R without following symbolic links (walks by directory descriptors)."""

  def walk(dir_fd: int) -> None:
    for entry in os.scandir(dir_fd):
      st = entry.stat(follow_symlinks=False)
      if (st.st_uid, st.st_gid) != (uid, gid):
        os.chown(entry.name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
      if stat.S_ISDIR(st.st_mode):
        try:
          fd = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
        except OSError:
          continue
        try:
          walk(fd)
        finally:
          os.close(fd)

  fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
  try:
    os.fchown(fd, uid, gid)
    walk(fd)
  finally:
    os.close(fd)


def _components(root: str, path: str, aliases: Sequence[str]) -> list[str]:
  """`path` as components relative to `root` (an absolute path must lie under it)."""
  if os.path.isabs(path):
    for prefix in (root, *aliases):
      if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
        path = path[len(prefix) :]
        break
    else:
      raise PermissionError(f"path {path!r} is outside the working directory")
  return [c for c in path.split("/") if c not in ("", ".")]


def open_in_root(
  root: str,
  path: str,
  flags: int,
  *,
  create: bool = False,
  owner: tuple[int, int] | None = None,
  aliases: Sequence[str] = (),
) -> int:
  """Opens the regular file `path` of the directory `root` and returns its descriptor.

  Each component is opened with O_NOFOLLOW relative to the previous one; a symbolic
  link is read and its target walked in turn, but only while it stays inside `root`
  (an absolute target must start with `root` or one of `aliases`, and `..` never
  climbs above `root`). FIFOs, devices, sockets and directories are refused without
  being opened for reading or writing. With `create`, missing parent directories and
  the file are created (and chowned to `owner`). `flags`: O_RDONLY, O_WRONLY or
  O_RDWR, plus O_TRUNC.
  """
  todo = list(reversed(_components(root, path, aliases)))
  stack = [os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)]
  links = 0
  try:
    while todo:
      name = todo.pop()
      if name == "..":
        if len(stack) == 1:
          raise PermissionError(f"path {path!r} is outside the working directory")
        os.close(stack.pop())
        continue
      here = stack[-1]
      try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=here)
      except FileNotFoundError:
        if not create:
          raise FileNotFoundError(errno.ENOENT, f"no such file: {path!r}") from None
        if todo:
          os.mkdir(name, 0o755, dir_fd=here)
          if owner is not None:
            os.chown(name, *owner, dir_fd=here, follow_symlinks=False)
          todo.append(name)
          continue
        fd = os.open(
          name,
          os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
          0o644,
          dir_fd=here,
        )
        if owner is not None:
          os.fchown(fd, *owner)
        return fd
      mode = os.fstat(fd).st_mode
      if stat.S_ISLNK(mode):
        os.close(fd)
        links += 1
        if links > MAX_SYMLINKS:
          raise OSError(errno.ELOOP, f"too many symbolic links in {path!r}")
        target = os.readlink(name, dir_fd=here)
        if os.path.isabs(target):
          try:
            parts = _components(root, target, aliases)
          except PermissionError:
            raise PermissionError(
              f"{path!r} leads through a symbolic link to {target!r}, outside the working directory"
            ) from None
          while len(stack) > 1:
            os.close(stack.pop())
        else:
          parts = [c for c in target.split("/") if c not in ("", ".")]
        todo.extend(reversed(parts))
      elif stat.S_ISDIR(mode):
        stack.append(fd)
      elif todo:
        os.close(fd)
        raise NotADirectoryError(errno.ENOTDIR, f"not a directory in {path!r}: {name!r}")
      elif not stat.S_ISREG(mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{path!r} is not a regular file (FIFO, device or socket)")
      else:
        try:  # reopen the very file found above, whatever the path names by now
          return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)
        finally:
          os.close(fd)
    raise IsADirectoryError(errno.EISDIR, f"{path!r} is a directory")
  finally:
    for fd in stack:
      os.close(fd)
