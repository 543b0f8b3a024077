"""TensorFlow's native start-up log, kept off a convflow command's terminal.

Importing TensorFlow prints, from C++ and before its logging reads TF_CPP_MIN_LOG_LEVEL, a
banner ("All log messages before absl::InitializeLog() ..."), oneDNN's and CUDA's notices, and on
a machine without GPU an error line, "failed call to cuInit ... (303)": no level hides them, and a
new user reads them as a failure. The command's stderr (file descriptor 2, so the C++ runtime and
child processes write through it too) goes through a filter process that drops those lines and
passes every other byte: Python tracebacks, Prefect's logs, TensorFlow's warnings and real errors.

A process of its own, not a thread: a thread dies with a process that TensorFlow aborts, taking
the fatal message with it; the filter reads to the end and exits when every writer has gone.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import sys
import time

# absl's native log line: severity letter, date, time, thread id, file:line] message.
NATIVE_LINE = re.compile(rb"^([IWEF])\d{4} [\d:.]+\s+\d+ [^\]\s]+:\d+\] ")
STARTUP_BANNER = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# The second line of cpu_feature_guard's info message.
CPU_FEATURES_TAIL = b"To enable the following instructions:"
NO_CUDA_DRIVER = b"Could not find cuda drivers"
CUINIT_FAILED = b"failed call to cuInit"
# A partial line starting with one of these may become a dropped line: wait for its end.
NOISE_FIRST_BYTES = b"IWEFT"
FILTER_EXIT_SECONDS = 3.0
# The command's last line to the filter: all before it is passed on, then the filter exits, without
# waiting for children that outlive the command (multiprocessing's resource tracker holds stderr
# until the command has exited, which would keep the filter and the command waiting on each other).
END_OF_COMMAND = b"\0convflow: end of command\0"


class NativeLogFilter:
    """Decides, line by line, what reaches the terminal."""

    def __init__(self) -> None:
        self.no_cuda_driver = False

    def keep(self, line: bytes) -> bool:
        """Whether `line` (one line of stderr, with or without its newline) is shown."""
        if line.startswith((STARTUP_BANNER, CPU_FEATURES_TAIL)):
            return False
        match = NATIVE_LINE.match(line)
        if match is None:
            return True
        if NO_CUDA_DRIVER in line:
            self.no_cuda_driver = True
        if match.group(1) == b"I":
            return False
        # cuInit fails on every machine without a CUDA driver, which TensorFlow has just said it
        # did not find: no GPU was there to use. With a driver present, the failure is real.
        return not (self.no_cuda_driver and CUINIT_FAILED in line)


def _forward(source: int, terminal: int) -> None:
    """Copy `source` to `terminal` until its end, dropping what NativeLogFilter drops."""
    decide = NativeLogFilter()
    pending = b""
    while chunk := os.read(source, 65536):
        *lines, pending = (pending + chunk).split(b"\n")
        end = next((index for index, line in enumerate(lines) if line.endswith(END_OF_COMMAND)), None)
        if end is not None:  # the marker may follow a last line without newline (a prompt)
            last = lines[end][: -len(END_OF_COMMAND)]
            os.write(terminal, b"".join(line + b"\n" for line in lines[:end] if decide.keep(line)) + last)
            return
        shown = b"".join(line + b"\n" for line in lines if decide.keep(line))
        if pending and pending[:1] not in NOISE_FIRST_BYTES:  # a prompt or progress without newline
            shown, pending = shown + pending, b""
        if shown:
            os.write(terminal, shown)
    if pending and decide.keep(pending):
        os.write(terminal, pending)


def _run_filter(source: int, write_end: int, terminal: int) -> None:
    """The filter process: it outlives Ctrl-C and SIGTERM sent to the command's process group, so
    the command's last words (an interrupted run's message) still reach the terminal."""
    os.close(write_end)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        _forward(source, terminal)
    finally:
        os._exit(0)


def filter_native_log() -> None:
    """From now on, this process's stderr (and its children's) goes through the filter. Call it
    before TensorFlow is imported and before any thread starts (it forks); the filter is waited
    for at exit, so the terminal shows everything before the shell's next prompt."""
    try:
        terminal = os.dup(2)
    except OSError:  # no stderr at all: nothing to keep clean
        return
    read_end, write_end = os.pipe()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _run_filter(read_end, write_end, terminal)
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    atexit.register(_stop_filter, pid, terminal)


def _stop_filter(pid: int, terminal: int) -> None:
    """Tell the filter the command is done, put stderr back on the terminal and give the filter time
    to pass on what it holds."""
    sys.stderr.flush()
    os.write(2, END_OF_COMMAND + b"\n")
    os.dup2(terminal, 2)
    os.close(terminal)
    deadline = time.monotonic() + FILTER_EXIT_SECONDS
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return
        time.sleep(0.01)
